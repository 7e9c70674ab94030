# Two private buckets (modules/private_bucket: no public access, versioned, KMS, TLS only).
#   artifacts  MLflow's artifacts (models, plots, manifests) under mlflow/. The MLflow server
#              proxies them (--artifacts-destination), so its task role is the only one that
#              touches this bucket.
#   data       the training images in the Kaggle layout under var.data_prefix, and the
#              notebook's code under code/: the training task and the notebook instance read it.
# Names carry the account and region, so two deployments never collide.

module "artifacts_bucket" {
  source = "./modules/private_bucket"

  name          = "${var.name}-artifacts-${local.account_id}-${local.region}"
  kms_key_arn   = aws_kms_key.main.arn
  force_destroy = !var.protect_data
}

module "data_bucket" {
  source = "./modules/private_bucket"

  name          = "${var.name}-data-${local.account_id}-${local.region}"
  kms_key_arn   = aws_kms_key.main.arn
  force_destroy = !var.protect_data
}

locals {
  artifacts_destination = "s3://${module.artifacts_bucket.id}/mlflow"
  data_root             = "s3://${module.data_bucket.id}/${var.data_prefix}"
  feedback_prefix       = "feedback" # the webapp's kept films (hm_mlflow.monitoring.films)
  code_uri              = "s3://${module.data_bucket.id}/code/"
}
