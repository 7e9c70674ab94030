# MLflow basic authentication: the admin's password, one password per client user, and the key
# that signs the UI's session cookies, each generated here and kept in Secrets Manager (also
# with var.mlflow_auth = false, so that switching it on needs no new secrets). Tasks receive them as ECS secrets, the notebook instance reads the notebook
# user's through its role: no password in a task definition, an image or an output.
#
#   admin     used by nobody but the MLflow task's access step, which creates the users below
#   webapp    reads the registered model and its experiment (loads the Production version)
#   trainer   creates runs and model versions, moves the alias (the training task)
#   notebook  the same as trainer, as its own user (the SageMaker notebook)
#
# The database password is not here: RDS manages it (rds.tf).

locals {
  mlflow_secrets = toset(["admin", "webapp", "trainer", "notebook", "flask-secret-key"])
}

resource "random_password" "mlflow" {
  for_each = local.mlflow_secrets

  length  = 40
  special = false # goes into an INI file and a basic-auth header unescaped
}

resource "aws_secretsmanager_secret" "mlflow" {
  #checkov:skip=CKV2_AWS_57:Rotating a basic-auth password needs a Lambda that also changes it in MLflow's user store; rotate by tainting random_password and applying (README). The database password is rotated by RDS
  for_each = local.mlflow_secrets

  name                    = "${var.name}/mlflow/${each.key}"
  description             = "MLflow basic auth: ${each.key}"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = var.secret_recovery_days
}

resource "aws_secretsmanager_secret_version" "mlflow" {
  for_each = local.mlflow_secrets

  secret_id     = aws_secretsmanager_secret.mlflow[each.key].id
  secret_string = random_password.mlflow[each.key].result
}

# The prediction log's database role (hm_mlflow.monitoring): its password generated here, never
# rotated by AWS (each MLflow task start sets the role's password from this secret, so changing
# it is `terraform taint random_password.predictions_db` and an apply); read by the webapp,
# training and monitor tasks as an ECS secret.
resource "random_password" "predictions_db" {
  length  = 40
  special = false # goes into a database URI
}

resource "aws_secretsmanager_secret" "predictions_db" {
  #checkov:skip=CKV2_AWS_57:The MLflow task sets the role's password from this secret at every start; a rotation Lambda would change it under the running webapp tasks. Rotate by tainting random_password.predictions_db and applying (README)
  name                    = "${var.name}/predictions/db"
  description             = "The prediction log's database role (predictions)"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = var.secret_recovery_days
}

resource "aws_secretsmanager_secret_version" "predictions_db" {
  secret_id     = aws_secretsmanager_secret.predictions_db.id
  secret_string = random_password.predictions_db.result
}
