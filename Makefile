# The two set-up commands: `make up` (the platform) and `make test` (the test suite).
# Both create .venv/ and install the project into it when needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# docker-compose 1.29.2 validates and renders docker-compose.yaml offline; it needs an old PyYAML,
# hence a virtual environment of its own.
COMPOSE := .venv-compose/bin/docker-compose
# checkov scans infra/; its pins clash with the project's, hence an environment of its own too.
CHECKOV := .venv-checkov/bin/checkov

.PHONY: help up test lint train sample bench bundle-model clean lock provider-schemas notebook \
        reviewer monitor

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# PyTorch (the train extra) is pinned to its CPU build, which PyTorch's own index serves, not
# PyPI: its page of torch wheels is a --find-links source, unless a local wheel folder already
# holds the wheel. (A page of links, not an extra index: uv would take every package that index
# also serves, numpy and pillow among them, from it alone.)
TORCH_WHEEL  := $(firstword $(wildcard $(PIP_FIND_LINKS)/torch-2.13.0+cpu-*.whl /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH_WHEELS ?= $(if $(TORCH_WHEEL),$(dir $(TORCH_WHEEL)),https://download.pytorch.org/whl/cpu/torch/)

# The environment is installed by uv, which pip puts into it first: in about half pip's time
# (bench/install.py, README "Quick start"). INSTALLER=pip installs with pip alone; so does a
# machine where pip finds no uv wheel to install. Bytecode is compiled at install, as pip does:
# where PYTHONDONTWRITEBYTECODE is set (CI here), Python would otherwise compile every module
# again in every process it starts.
INSTALLER  ?= uv
UV_VERSION := 0.13.9

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "hm-mlflow needs Python 3.11; set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(BIN)/pip install --quiet --only-binary :all: "uv==$(UV_VERSION)"; then \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --find-links $(TORCH_WHEELS) \
	    -c constraints.txt -e ".[dev]"; \
	else \
	  $(BIN)/pip install --quiet --upgrade "pip==26.3" \
	  && $(BIN)/pip install --quiet --find-links $(TORCH_WHEELS) -c constraints.txt -e ".[dev]"; \
	fi
	touch $@

# The two side environments are installed by the main environment's uv where it has one
# (checkov: 10 s against pip's 50 s), else by their own pip.
side-install = $(if $(wildcard $(BIN)/uv),$(BIN)/uv pip install --quiet --compile-bytecode --python $(1)/bin/python,$(1)/bin/pip install --quiet)

$(COMPOSE): .ci/docker-compose-constraints.txt | $(STAMP)
	test -x .venv-compose/bin/python || $(PYTHON) -m venv .venv-compose
	$(call side-install,.venv-compose) -c $< "cython<3" wheel setuptools
	$(call side-install,.venv-compose) -c $< --no-build-isolation pyyaml
	$(call side-install,.venv-compose) -c $< docker-compose==1.29.2
	touch $@

$(CHECKOV): .ci/checkov-constraints.txt | $(STAMP)
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	$(call side-install,.venv-checkov) -c $< checkov
	touch $@

up: $(STAMP)  ## run MLflow + the webapp on this machine (Ctrl-C stops both)
	$(BIN)/hm-mlflow up

test: lint $(COMPOSE) $(CHECKOV)  ## lint, then the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff: lint rules and formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

notebook: $(STAMP)  ## JupyterLab on the training notebook (with make up running)
	$(BIN)/jupyter lab --notebook-dir=jupyter jupyter/training_notebook.ipynb

train: $(STAMP)  ## train on HM_DATA_DIR (default source/chest_xray) against the running platform
	$(BIN)/hm-mlflow train

reviewer: $(STAMP)  ## a reader's token to label answers: make reviewer NAME=ann
	@test -n "$(NAME)" || { echo "usage: make reviewer NAME=ann"; exit 2; }
	$(BIN)/hm-mlflow reviewer add $(NAME)

monitor: $(STAMP)  ## how each version does in service, into MLflow, once (with make up running)
	$(BIN)/hm-mlflow monitor

sample: $(STAMP)  ## generate the synthetic sample set into .state/sample
	$(BIN)/hm-mlflow sample

SHARED_DATA ?= ../shared/data/cxr

bundle-model: $(STAMP)  ## retrain the bundled model on ../shared/data/cxr
	$(BIN)/hm-mlflow bundle-model --data $(SHARED_DATA)

bench: $(STAMP)  ## benchmarks on ../shared/data/cxr: features, quality, serving (needs wrk), a new site
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/site.py

lock:  ## re-pin every transitive dependency in constraints.txt from a fresh environment
	rm -rf /tmp/hm-mlflow-lock && $(PYTHON) -m venv /tmp/hm-mlflow-lock
	/tmp/hm-mlflow-lock/bin/pip install --quiet -e ".[dev]"
	{ echo '# Every transitive dependency, pinned: regenerate with `make lock`.'; \
	  /tmp/hm-mlflow-lock/bin/pip freeze --exclude-editable | grep -v '^hm-mlflow'; } > constraints.txt

provider-schemas:  ## re-extract the AWS provider's schema (tests/provider_schemas/)
	rm -rf /tmp/hm-mlflow-schemas && mkdir -p /tmp/hm-mlflow-schemas
	cd /tmp/hm-mlflow-schemas && npm pack --silent @cdktn/provider-aws@25.7.0
	cd /tmp/hm-mlflow-schemas && for t in *.tgz; do mkdir -p $${t%.tgz} && tar xzf $$t -C $${t%.tgz} package/.jsii; done
	$(BIN)/python tests/provider_schemas/extract.py /tmp/hm-mlflow-schemas/cdktn-provider-aws-25.7.0/package/.jsii tests/provider_schemas/aws-provider-6.66.0.json.gz

clean:  ## remove the virtual environments (the state folder .state/ is kept)
	rm -rf $(VENV) .venv-compose .venv-checkov
