#!/bin/bash
# SageMaker lifecycle configuration, on every start of the notebook instance (runs as root).
# Rendered by Terraform (sagemaker.tf): the values below come from the deployment.
#
# 1. The notebook's environment: where MLflow and the data are, which MLflow user it is. The
#    password is not written anywhere: the notebook reads it from Secrets Manager with the
#    instance's role (HM_MLFLOW_SECRET_ID).
# 2. The project's notebook requirements, in the background (a lifecycle script must finish
#    within 5 minutes): a Python 3.11 environment (conda-forge) on the persistent volume, the
#    hm-mlflow wheel that `hm-mlflow cloud upload-code` put in the data bucket (waited for: on
#    the first start it is not there yet), its `notebook` extra with the
#    project's pinned constraints, registered as the kernel `python3` ("hm-mlflow"), and the
#    training notebook copied to the home folder if it is not there yet.
set -euo pipefail

cat > /etc/profile.d/hm-mlflow.sh <<'ENVIRONMENT'
export HM_PROFILE=cloud
export MLFLOW_TRACKING_URI="${mlflow_url}"
export MLFLOW_TRACKING_USERNAME="${mlflow_username}"
export HM_MLFLOW_SECRET_ID="${mlflow_secret_id}"
export HM_DATA_DIR="${data_root}"
export HM_MODEL_NAME="${model_name}"
export HM_EXPERIMENT="${experiment}"
export HM_CODE_URI="${code_uri}"
export AWS_DEFAULT_REGION="${region}"
ENVIRONMENT
chmod 0644 /etc/profile.d/hm-mlflow.sh

cat > /usr/local/bin/hm-mlflow-notebook-install <<'INSTALL'
#!/bin/bash
# Installs (or updates) the hm-mlflow kernel. Safe to run again by hand.
set -euo pipefail
source /etc/profile.d/hm-mlflow.sh
home=/home/ec2-user/SageMaker
env="$home/.envs/hm-mlflow"
# The wheel arrives with `hm-mlflow cloud upload-code`, which a first deployment runs after
# `terraform apply` has started this instance: wait for it (every 30 s, up to 2 hours).
waited=0
# (grep reads the whole listing: -q would stop early and, under pipefail, fail the pipe)
until aws s3 ls "$HM_CODE_URI" 2>/dev/null | grep 'hm_mlflow-.*\.whl' >/dev/null; do
  if [ "$waited" -ge 7200 ]; then
    echo "no hm-mlflow wheel in $HM_CODE_URI after 2 hours: run hm-mlflow cloud upload-code," \
      "then: sudo -u ec2-user -i /usr/local/bin/hm-mlflow-notebook-install" >&2
    exit 1
  fi
  echo "waiting for the hm-mlflow wheel in $HM_CODE_URI (hm-mlflow cloud upload-code)"
  sleep 30
  waited=$((waited + 30))
done
code="$(mktemp -d)"
aws s3 cp --recursive --only-show-errors "$HM_CODE_URI" "$code"
wheel="$(ls "$code"/hm_mlflow-*.whl | tail -n 1)"
conda="$(command -v conda || echo /home/ec2-user/anaconda3/bin/conda)"
# conda-forge only: Anaconda's `defaults` channels may stop a non-interactive create on their
# terms-of-service prompt.
[ -x "$env/bin/python" ] ||
  "$conda" create --yes --quiet --override-channels -c conda-forge --prefix "$env" python=3.11
"$env/bin/python" -m pip install --quiet --upgrade "pip==26.3"
"$env/bin/python" -m pip install --quiet -c "$code/constraints.txt" "$wheel[notebook]"
"$env/bin/python" -m ipykernel install --user --name python3 --display-name "hm-mlflow (Python 3.11)"
[ -e "$home/training_notebook.ipynb" ] || cp "$code/training_notebook.ipynb" "$home/"
rm -rf "$code"
echo "hm-mlflow kernel ready"
INSTALL
chmod 0755 /usr/local/bin/hm-mlflow-notebook-install

sudo -u ec2-user -i nohup /usr/local/bin/hm-mlflow-notebook-install \
  > /home/ec2-user/SageMaker/hm-mlflow-install.log 2>&1 &

# Jupyter picks up /etc/profile.d only when it starts.
systemctl restart jupyter-server || true
