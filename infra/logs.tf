# CloudWatch log groups: one per task family, named as the task definitions' awslogs settings
# say, plus the VPC's flow logs. Encrypted with the project's key.

locals {
  log_groups = {
    mlflow   = "/ecs/${var.name}-mlflow"
    webapp   = "/ecs/${var.name}-webapp"
    training = "/ecs/${var.name}-model-training"
    monitor  = "/ecs/${var.name}-monitor"
    batch    = "/aws/batch/${var.name}-predict"
  }
}

resource "aws_cloudwatch_log_group" "service" {
  for_each = local.log_groups

  name              = each.value
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_cloudwatch_log_group" "flow_logs" {
  count = var.flow_logs ? 1 : 0

  name              = "/vpc/${var.name}-flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}
