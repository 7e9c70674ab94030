# Roles, each with only what its holder does. No user, no access key: tasks and the notebook
# get short-lived credentials from their roles.
#
#   execution  ECS itself: pull the three images, write the three log groups, read the secrets
#   mlflow     the MLflow server: read and write its artifact prefix (it proxies every artifact)
#   webapp     write the films it keeps for the readers under DATA_BUCKET/feedback/, and nothing
#              else: MLflow serves it the model over HTTP
#   training   read the training data (and the readers' films beside it)
#   monitor    start the training task and follow it (PassRole limited to that task's two roles)
#   scheduler  EventBridge Scheduler: start the monitor task (PassRole to its two roles)
#   notebook   read the training data and the notebook's code, read its MLflow password, start
#              the training task and follow it (PassRole limited to that task's two roles)

locals {
  task_roles  = toset(["mlflow", "webapp", "training", "monitor", "batch"])
  cluster_arn = "arn:${local.partition}:ecs:${local.region}:${local.account_id}:cluster/${local.cluster_name}"
}

data "aws_iam_policy_document" "ecs_tasks_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# --- Execution role (ECS agent) ------------------------------------------------------------------

resource "aws_iam_role" "execution" {
  name               = "${var.name}-ecs-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_trust.json
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions
  }
  statement {
    sid       = "PullImages"
    actions   = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]
    resources = [for repo in aws_ecr_repository.this : repo.arn]
  }
  statement {
    sid       = "WriteLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [for group in aws_cloudwatch_log_group.service : "${group.arn}:*"]
  }
  statement {
    sid     = "ReadSecrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = concat(
      [for secret in aws_secretsmanager_secret.mlflow : secret.arn],
      [aws_secretsmanager_secret.database.arn],
      [aws_secretsmanager_secret.predictions_db.arn],
    )
  }
  statement {
    sid       = "DecryptSecretsAndImages"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "pull-log-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

# --- Task roles (the containers' own AWS credentials) --------------------------------------------

resource "aws_iam_role" "task" {
  for_each = local.task_roles

  name               = "${var.name}-${each.key}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_trust.json
}

data "aws_iam_policy_document" "mlflow_task" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [module.artifacts_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["mlflow", "mlflow/*"]
    }
  }
  statement {
    sid       = "ReadWriteArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${module.artifacts_bucket.arn}/mlflow/*"]
  }
  statement {
    sid       = "EncryptArtifacts"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "mlflow_task" {
  name   = "artifacts"
  role   = aws_iam_role.task["mlflow"].id
  policy = data.aws_iam_policy_document.mlflow_task.json
}

# Reading the training data: the training task and the notebook instance.
data "aws_iam_policy_document" "read_data" {
  statement {
    sid       = "ListData"
    actions   = ["s3:ListBucket"]
    resources = [module.data_bucket.arn]
  }
  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject"]
    resources = ["${module.data_bucket.arn}/*"]
  }
  statement {
    sid       = "DecryptData"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "training_task" {
  name   = "read-data"
  role   = aws_iam_role.task["training"].id
  policy = data.aws_iam_policy_document.read_data.json
}

# The webapp writes each film it keeps under the feedback prefix, and can do nothing else there:
# no read, no list, no delete, no other prefix or bucket.
data "aws_iam_policy_document" "webapp_task" {
  statement {
    sid       = "KeepFilms"
    actions   = ["s3:PutObject"]
    resources = ["${module.data_bucket.arn}/${local.feedback_prefix}/*"]
  }
  statement {
    sid       = "EncryptFilms"
    actions   = ["kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "webapp_task" {
  name   = "keep-films"
  role   = aws_iam_role.task["webapp"].id
  policy = data.aws_iam_policy_document.webapp_task.json
}

# Starting the training task, and passing it its two roles: the monitor's whole policy, and part
# of the notebook's.
data "aws_iam_policy_document" "start_training" {
  statement {
    sid       = "StartTraining"
    actions   = ["ecs:RunTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task-definition/${local.training_family}:*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "PassTrainingRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.execution.arn, aws_iam_role.task["training"].arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
}

# The monitor starts the training task when a site drifts, and nothing else.
resource "aws_iam_role_policy" "monitor_task" {
  name   = "start-training"
  role   = aws_iam_role.task["monitor"].id
  policy = data.aws_iam_policy_document.start_training.json
}

# --- EventBridge Scheduler: the monitor task, daily -----------------------------------------------

data "aws_iam_policy_document" "scheduler_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["scheduler.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "scheduler" {
  name               = "${var.name}-monitor-schedule"
  assume_role_policy = data.aws_iam_policy_document.scheduler_trust.json
}

data "aws_iam_policy_document" "scheduler" {
  statement {
    sid       = "StartMonitor"
    actions   = ["ecs:RunTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task-definition/${var.name}-monitor:*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "PassMonitorRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.execution.arn, aws_iam_role.task["monitor"].arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "start-monitor"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}

# --- Notebook instance ----------------------------------------------------------------------------

data "aws_iam_policy_document" "sagemaker_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["sagemaker.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "notebook" {
  name               = "${var.name}-notebook"
  assume_role_policy = data.aws_iam_policy_document.sagemaker_trust.json
}

resource "aws_iam_role_policy" "notebook_data" {
  name   = "read-data"
  role   = aws_iam_role.notebook.id
  policy = data.aws_iam_policy_document.read_data.json
}

data "aws_iam_policy_document" "notebook" {
  source_policy_documents = [data.aws_iam_policy_document.start_training.json]

  statement {
    sid       = "FollowTraining"
    actions   = ["ecs:DescribeTasks", "ecs:StopTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:task/${local.cluster_name}/*"]
  }
  statement {
    sid       = "ListTasks"
    actions   = ["ecs:ListTasks"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:container-instance/${local.cluster_name}/*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }
  statement {
    sid       = "ServiceStatus"
    actions   = ["ecs:DescribeServices"]
    resources = [for service in aws_ecs_service.this : service.id]
  }
  statement {
    sid       = "ReadTrainingLogs"
    actions   = ["logs:GetLogEvents", "logs:FilterLogEvents"]
    resources = ["${aws_cloudwatch_log_group.service["training"].arn}:*"]
  }
  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/aws/sagemaker/NotebookInstances:*"]
  }
  statement {
    sid       = "MlflowPassword"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.mlflow["notebook"].arn]
  }
}

resource "aws_iam_role_policy" "notebook" {
  name   = "train-and-follow"
  role   = aws_iam_role.notebook.id
  policy = data.aws_iam_policy_document.notebook.json
}

# --- VPC flow logs -------------------------------------------------------------------------------

data "aws_iam_policy_document" "flow_logs_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  count = var.flow_logs ? 1 : 0

  name               = "${var.name}-flow-logs"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_trust.json
}

data "aws_iam_policy_document" "flow_logs" {
  count = var.flow_logs ? 1 : 0

  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.flow_logs[0].arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  count = var.flow_logs ? 1 : 0

  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs[0].id
  policy = data.aws_iam_policy_document.flow_logs[0].json
}
