# The loop's daily pass on AWS: EventBridge Scheduler starts the monitor task (ecs.tf), which runs
# `hm-mlflow monitor --retrain-on-drift`: how each version does at each site, into MLflow, and
# the training task when a site drifts or its live sensitivity falls under the floor with enough
# labels (hm_mlflow.monitoring.monitor). The schedule's role may start that task and pass its two
# roles, nothing else (iam.tf).

resource "aws_scheduler_schedule" "monitor" {
  #checkov:skip=CKV_AWS_297:A customer-managed key would encrypt only the schedule's input payload, and this schedule has none; its name, state and expression are never encrypted with a CMK (EventBridge Scheduler encryption at rest)
  name                = "${var.name}-monitor"
  description         = "hm-mlflow monitor --retrain-on-drift"
  schedule_expression = var.monitor_schedule

  flexible_time_window {
    mode                      = "FLEXIBLE"
    maximum_window_in_minutes = 60
  }

  target {
    arn      = aws_ecs_cluster.main.arn
    role_arn = aws_iam_role.scheduler.arn

    ecs_parameters {
      task_definition_arn     = aws_ecs_task_definition.this["monitor"].arn_without_revision
      launch_type             = "FARGATE"
      task_count              = 1
      enable_ecs_managed_tags = true

      network_configuration {
        subnets          = aws_subnet.private[*].id
        security_groups  = [aws_security_group.this["monitor"].id]
        assign_public_ip = false
      }
    }

    retry_policy {
      maximum_retry_attempts       = 2
      maximum_event_age_in_seconds = 3600
    }
  }
}
