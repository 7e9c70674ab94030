# MLflow basic authentication: the admin's password, one password per client user, and the key
# that signs the UI's session cookies, each generated here and kept in Secrets Manager (also
# with var.mlflow_auth = false, so that switching it on needs no new secrets). Tasks receive
# them as ECS secrets, the notebook instance reads the notebook user's through its role: no
# password in a task definition, an image, an output or the Terraform state. Each is drawn by
# Secrets Manager's GetRandomPassword as an ephemeral value and written with write-only
# arguments (Terraform >= 1.11), which are sent to AWS and never stored.
#
#   admin     used by nobody but the MLflow task's access step, which creates the users below
#   webapp    reads the registered model and its experiment (loads the Production version)
#   trainer   creates runs and model versions, moves the alias (the training task)
#   notebook  the same as trainer, as its own user (the SageMaker notebook)
#
# The database's master password is here too, and deliberately not rotated: ECS injects a
# secret only when a task starts, so a rotation (RDS's managed secret rotates every 7 days)
# would break every new connection of the running MLflow tasks until they were replaced. It
# changes when var.password_version does (README, "Passwords").

locals {
  mlflow_secrets = toset(["admin", "webapp", "trainer", "notebook", "flask-secret-key"])
  # A secret scheduled for deletion keeps its name for the recovery window: a deployment of the
  # same name after a destroy would be refused. Unprotected, they go at once.
  secret_recovery_days = var.protect_data ? var.secret_recovery_days : 0
}

ephemeral "aws_secretsmanager_random_password" "mlflow" {
  for_each = local.mlflow_secrets

  password_length     = 40
  exclude_punctuation = true # goes into an INI file and a basic-auth header unescaped
}

resource "aws_secretsmanager_secret" "mlflow" {
  #checkov:skip=CKV2_AWS_57:Rotating a basic-auth password needs a Lambda that also changes it in MLflow's user store, and running tasks hold the old one; a client user's is drawn anew by replacing its version and deploying again (README)
  for_each = local.mlflow_secrets

  name                    = "${var.name}/mlflow/${each.key}"
  description             = "MLflow basic auth: ${each.key}"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = local.secret_recovery_days
}

resource "aws_secretsmanager_secret_version" "mlflow" {
  for_each = local.mlflow_secrets

  secret_id                = aws_secretsmanager_secret.mlflow[each.key].id
  secret_string_wo         = ephemeral.aws_secretsmanager_random_password.mlflow[each.key].random_password
  secret_string_wo_version = 1 # a client user's anew: apply -replace on its version (README)
}

# The prediction log's database role (hm_mlflow.monitoring): its password generated here, never
# rotated by AWS (each MLflow task start sets the role's password from this secret); read by the
# webapp, training and monitor tasks as an ECS secret.
ephemeral "aws_secretsmanager_random_password" "predictions_db" {
  password_length     = 40
  exclude_punctuation = true # goes into a database URI
}

resource "aws_secretsmanager_secret" "predictions_db" {
  #checkov:skip=CKV2_AWS_57:The MLflow task sets the role's password from this secret at every start; a rotation Lambda would change it under the running webapp tasks. It changes with var.password_version and a new deployment (README)
  name                    = "${var.name}/predictions/db"
  description             = "The prediction log's database role (predictions)"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = local.secret_recovery_days
}

resource "aws_secretsmanager_secret_version" "predictions_db" {
  secret_id                = aws_secretsmanager_secret.predictions_db.id
  secret_string_wo         = ephemeral.aws_secretsmanager_random_password.predictions_db.random_password
  secret_string_wo_version = var.password_version
}

# The database's master password: one ephemeral value, written in the same apply to RDS
# (password_wo, rds.tf) and to this secret, which the MLflow task reads.
ephemeral "aws_secretsmanager_random_password" "database" {
  password_length     = 40
  exclude_punctuation = true # goes into a database URI
}

resource "aws_secretsmanager_secret" "database" {
  #checkov:skip=CKV2_AWS_57:Not rotated on purpose: ECS injects secrets at task start, so a rotation would break the running MLflow tasks' new connections; it changes with var.password_version and a new deployment (README)
  name                    = "${var.name}/database/master"
  description             = "The MLflow database's master password (RDS user mlflow)"
  kms_key_id              = aws_kms_key.main.arn
  recovery_window_in_days = local.secret_recovery_days
}

resource "aws_secretsmanager_secret_version" "database" {
  secret_id                = aws_secretsmanager_secret.database.id
  secret_string_wo         = ephemeral.aws_secretsmanager_random_password.database.random_password
  secret_string_wo_version = var.password_version
}
