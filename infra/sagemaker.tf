# The notebook instance: a private subnet, no direct internet access (all traffic goes through
# the VPC, so the private zone resolves mlflow.DOMAIN), no root access, the project's key on its
# volume. Its lifecycle configuration (sagemaker/on-start.sh) writes where MLflow and the data
# are into the notebook's environment and installs the project's notebook requirements.
# The notebook then runs with PROFILE = "cloud" and nothing else to edit.

locals {
  notebook_name = "${var.name}-notebook"
}

resource "aws_sagemaker_notebook_instance_lifecycle_configuration" "main" {
  name = "${var.name}-notebook"
  on_start = base64encode(templatefile("${path.module}/sagemaker/on-start.sh", {
    mlflow_url       = local.mlflow_internal_url
    mlflow_username  = var.mlflow_auth ? "notebook" : ""
    mlflow_secret_id = var.mlflow_auth ? aws_secretsmanager_secret.mlflow["notebook"].arn : ""
    data_root        = local.data_root
    model_name       = var.model_name
    experiment       = var.experiment
    code_uri         = local.code_uri
    region           = local.region
  }))
}

resource "aws_sagemaker_notebook_instance" "main" {
  name                   = local.notebook_name
  instance_type          = var.notebook_instance_type
  platform_identifier    = var.notebook_platform
  role_arn               = aws_iam_role.notebook.arn
  subnet_id              = aws_subnet.private[0].id
  security_groups        = [aws_security_group.this["notebook"].id]
  direct_internet_access = "Disabled"
  root_access            = "Disabled"
  kms_key_id             = aws_kms_key.main.arn
  volume_size            = var.notebook_volume_gb
  lifecycle_config_name  = aws_sagemaker_notebook_instance_lifecycle_configuration.main.name

  instance_metadata_service_configuration {
    minimum_instance_metadata_service_version = "2"
  }
}
