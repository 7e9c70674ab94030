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
# PyPI; pip asks that index too unless a local wheel folder already holds the wheel.
TORCH_WHEEL := $(wildcard $(PIP_FIND_LINKS)/torch-2.13.0+cpu-*.whl /opt/wheels/torch-2.13.0+cpu-*.whl)
TORCH_INDEX ?= $(if $(TORCH_WHEEL),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "hm-mlflow needs Python 3.11; set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"
	$(BIN)/pip install --quiet $(TORCH_INDEX) -c constraints.txt -e ".[dev]"
	touch $@

$(COMPOSE): .ci/docker-compose-constraints.txt
	test -x .venv-compose/bin/python || $(PYTHON) -m venv .venv-compose
	.venv-compose/bin/pip install --quiet -c $< "cython<3" wheel setuptools
	.venv-compose/bin/pip install --quiet -c $< --no-build-isolation pyyaml
	.venv-compose/bin/pip install --quiet -c $< docker-compose==1.29.2
	touch $@

$(CHECKOV): .ci/checkov-constraints.txt
	test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet -c $< checkov
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
