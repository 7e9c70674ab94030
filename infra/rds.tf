# MLflow's backend store: PostgreSQL in the private subnets, reachable from the MLflow tasks only.
# The master password is drawn by Secrets Manager (secrets.tf) and written here with a
# write-only argument: it is in no Terraform file, state or output, and reaches the MLflow
# container as an ECS secret. Not RDS's managed password: that one rotates every 7 days, and
# the running tasks, which received it at start, would lose the database.

resource "aws_db_subnet_group" "main" {
  name       = var.name
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_db_parameter_group" "main" {
  name   = "${var.name}-postgres16"
  family = "postgres16"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
}

resource "aws_db_instance" "mlflow" {
  #checkov:skip=CKV_AWS_157:A standby doubles the database cost; var.db_multi_az turns it on, and daily backups with 7-day retention cover a zone failure
  #checkov:skip=CKV_AWS_118:Enhanced monitoring adds a role and per-second metrics this small store does not need; basic CloudWatch metrics and exported logs remain
  #checkov:skip=CKV_AWS_353:Performance Insights is off to keep the smallest instance classes cheap; slow statements (over 1 s) are in the exported PostgreSQL log
  identifier     = "${var.name}-mlflow"
  engine         = "postgres"
  engine_version = "16"
  instance_class = var.db_instance_class

  db_name             = "mlflow"
  username            = "mlflow"
  password_wo         = ephemeral.aws_secretsmanager_random_password.database.random_password
  password_wo_version = var.password_version

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_allocated_storage * 5
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.main.arn

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.this["database"].id]
  parameter_group_name   = aws_db_parameter_group.main.name
  publicly_accessible    = false
  multi_az               = var.db_multi_az

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  backup_retention_period             = 7
  copy_tags_to_snapshot               = true
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]

  deletion_protection       = var.protect_data
  skip_final_snapshot       = !var.protect_data
  final_snapshot_identifier = "${var.name}-mlflow-final"
}
