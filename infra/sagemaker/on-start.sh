#!/bin/bash
# SageMaker lifecycle configuration, on every start of the notebook instance (runs as root).
# Rendered by Terraform (sagemaker.tf): the values below come from the deployment.
#
# 1. The notebook's environment: where MLflow and the data are, which MLflow user it is. The
#    password is not written anywhere: the notebook reads it from Secrets Manager with the
#    instance's role (HM_MLFLOW_SECRET_ID).
# 2. The project's notebook requirements, in the background (a lifecycle script must finish
#    within 5 minutes): a Python 3.11 environment on the persistent volume, the hm-mlflow wheel
#    that `hm-mlflow cloud upload-code` put in the data bucket, its `notebook` extra with the
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
code="$(mktemp -d)"
aws s3 cp --recursive --only-show-errors "$HM_CODE_URI" "$code"
wheel="$(ls "$code"/hm_mlflow-*.whl | tail -n 1)"
conda="$(command -v conda || echo /home/ec2-user/anaconda3/bin/conda)"
[ -x "$env/bin/python" ] || "$conda" create --yes --quiet --prefix "$env" python=3.11
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
