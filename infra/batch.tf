# Batch scoring on AWS Batch (`hm-mlflow cloud predict`): a Fargate compute environment in the
# private subnets, a job queue, and one job definition running the model image's
# `hm-mlflow predict` on its shard of an S3 prefix. An array job of N children writes one part
# file each (AWS_BATCH_JOB_ARRAY_INDEX picks the shard, a stable split by key); a dependent job
# runs `hm-mlflow predict-merge` on the same definition, which merges the parts into the
# results and logs the batch's MLflow run (hm_mlflow.batch, hm_mlflow.cloud).
#
# The job role reads the films under s3://DATA_BUCKET/<batch_input_prefix>/ and writes under
# s3://DATA_BUCKET/<batch_output_prefix>/, nothing else; the answers enter the prediction log
# like the webapp's, under the job's site.

locals {
  batch_input_arn  = "${module.data_bucket.arn}/${var.batch_input_prefix}"
  batch_output_arn = "${module.data_bucket.arn}/${var.batch_output_prefix}"

  batch_container = {
    image   = local.image_uri["model"]
    command = ["hm-mlflow", "predict", "--data", "Ref::data", "--out", "Ref::out", "--shards", "Ref::shards", "--site", "Ref::site", "--no-run"]
    environment = concat(local.mlflow_client_env, local.mlflow_client_user["trainer"].environment, [
      { name = "HM_DATA_DIR", value = "s3://${module.data_bucket.id}/${var.batch_input_prefix}" },
    ], local.prediction_log_env)
    secrets                = concat(local.mlflow_client_user["trainer"].secrets, [local.prediction_log_secret])
    jobRoleArn             = aws_iam_role.task["batch"].arn
    executionRoleArn       = aws_iam_role.execution.arn
    readonlyRootFilesystem = true
    volumes                = [{ name = local.tmp_volume }]
    mountPoints            = [{ sourceVolume = local.tmp_volume, containerPath = "/tmp", readOnly = false }]
    resourceRequirements = [
      { type = "VCPU", value = tostring(var.batch_vcpus) },
      { type = "MEMORY", value = tostring(var.batch_memory) },
    ]
    logConfiguration             = local.log_configuration["batch"]
    networkConfiguration         = { assignPublicIp = "DISABLED" }
    fargatePlatformConfiguration = { platformVersion = "LATEST" }
    runtimePlatform              = { operatingSystemFamily = "LINUX", cpuArchitecture = local.cpu_architecture }
  }
}

resource "aws_batch_compute_environment" "predict" {
  # No name argument: 5.x calls it compute_environment_name, 6.x name; AWS then names it, and
  # the tag says what it is.
  type  = "MANAGED"
  state = "ENABLED"

  compute_resources {
    type               = "FARGATE"
    max_vcpus          = var.batch_max_vcpus
    subnets            = aws_subnet.private[*].id
    security_group_ids = [aws_security_group.this["batch"].id]
  }

  tags = { Name = "${var.name}-predict" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_batch_job_queue" "predict" {
  name     = "${var.name}-predict"
  state    = "ENABLED"
  priority = 1

  compute_environment_order {
    order               = 1
    compute_environment = aws_batch_compute_environment.predict.arn
  }
}

resource "aws_batch_job_definition" "predict" {
  name                  = "${var.name}-predict"
  type                  = "container"
  platform_capabilities = ["FARGATE"]
  propagate_tags        = true
  container_properties  = jsonencode(local.batch_container)

  parameters = {
    data   = "s3://${module.data_bucket.id}/${var.batch_input_prefix}/"
    out    = "s3://${module.data_bucket.id}/${var.batch_output_prefix}/results.csv.parts/"
    shards = "1"
    site   = "batch"
  }

  retry_strategy {
    attempts = 2
    evaluate_on_exit {
      on_status_reason = "Task failed to start*"
      action           = "RETRY"
    }
    evaluate_on_exit {
      on_reason = "*"
      action    = "EXIT"
    }
  }

  timeout {
    attempt_duration_seconds = var.batch_timeout_seconds
  }
}

# The job role: the input prefix read, the output prefix read and written (a resumed shard reads
# its part file), nothing else.
data "aws_iam_policy_document" "batch_task" {
  statement {
    sid       = "ListInputAndOutput"
    actions   = ["s3:ListBucket"]
    resources = [module.data_bucket.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.batch_input_prefix}/*", "${var.batch_output_prefix}/*"]
    }
  }
  statement {
    sid       = "ReadFilms"
    actions   = ["s3:GetObject"]
    resources = ["${local.batch_input_arn}/*", "${local.batch_output_arn}/*"]
  }
  statement {
    sid       = "WriteResults"
    actions   = ["s3:PutObject"]
    resources = ["${local.batch_output_arn}/*"]
  }
  statement {
    sid       = "DecryptAndEncrypt"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_iam_role_policy" "batch_task" {
  name   = "score-prefix"
  role   = aws_iam_role.task["batch"].id
  policy = data.aws_iam_policy_document.batch_task.json
}
