# What the README and `hm-mlflow cloud` need. `terraform output -json > outputs.json` gives the
# CLI everything (hm-mlflow cloud --outputs outputs.json ...). No secret value is output: only
# the secrets' ARNs.

output "region" {
  description = "Region of the deployment."
  value       = local.region
}

output "name" {
  description = "Prefix of the resource names."
  value       = var.name
}

output "alb_dns_name" {
  description = "DNS name of the public load balancer (send Host: mlflow.DOMAIN or app.DOMAIN)."
  value       = aws_lb.this["public"].dns_name
}

output "internal_alb_dns_name" {
  description = "DNS name of the internal load balancer that the private zone points at."
  value       = aws_lb.this["internal"].dns_name
}

output "mlflow_url" {
  description = "MLflow's URL: inside the VPC through the private zone; from a laptop see README."
  value       = "${local.public_scheme}://${local.mlflow_host}"
}

output "app_url" {
  description = "The webapp's URL (same remark)."
  value       = "${local.public_scheme}://${local.app_host}"
}

output "mlflow_internal_url" {
  description = "MLflow's URL for the tasks and the notebook instance."
  value       = local.mlflow_internal_url
}

output "domain" {
  description = "Domain of the two host names."
  value       = var.domain
}

output "private_subnet_ids" {
  description = "Private subnets: where the training task runs."
  value       = aws_subnet.private[*].id
}

output "task_security_group_id" {
  description = "Security group of the training task."
  value       = aws_security_group.this["training"].id
}

output "cluster_name" {
  description = "ECS cluster."
  value       = aws_ecs_cluster.main.name
}

output "services" {
  description = "ECS service names, by role."
  value       = { for key, service in aws_ecs_service.this : key => service.name }
}

output "training_task_definition" {
  description = "Family of the training task definition (aws ecs run-task --task-definition)."
  value       = aws_ecs_task_definition.this["training"].family
}

output "monitor_task_definition" {
  description = "Family of the monitor task definition (EventBridge Scheduler runs it daily)."
  value       = aws_ecs_task_definition.this["monitor"].family
}

output "monitor_security_group_id" {
  description = "Security group of the monitor task (hm-mlflow cloud reviewer runs in it too)."
  value       = aws_security_group.this["monitor"].id
}

output "monitor_schedule" {
  description = "The EventBridge Scheduler schedule of the monitor task."
  value       = aws_scheduler_schedule.monitor.name
}

output "feedback_uri" {
  description = "Where the webapp keeps each answered film for the readers."
  value       = local.feedback_uri
}

output "training_container_name" {
  description = "Container of the training task (for overrides and its log stream)."
  value       = local.training_container
}

output "artifact_bucket" {
  description = "MLflow's artifact bucket (only the MLflow task role can use it)."
  value       = module.artifacts_bucket.id
}

output "data_bucket" {
  description = "Training data bucket."
  value       = module.data_bucket.id
}

output "data_root" {
  description = "The training data root in the Kaggle layout (hm-mlflow cloud upload-data)."
  value       = local.data_root
}

output "code_uri" {
  description = "Where the notebook instance installs hm-mlflow from (hm-mlflow cloud upload-code)."
  value       = local.code_uri
}

output "ecr_repository_urls" {
  description = "ECR repository URL of each image."
  value       = { for key, repo in aws_ecr_repository.this : key => repo.repository_url }
}

output "image_tag" {
  description = "Tag the task definitions run."
  value       = var.image_tag
}

output "image_platform" {
  description = "Platform the images are built for (docker build --platform): the task definitions' CPU architecture."
  value       = local.image_platform
}

output "dockerfiles" {
  description = "Dockerfile of each image, relative to the repository root."
  value       = local.images
}

output "log_groups" {
  description = "CloudWatch log group of each task family."
  value       = { for key, group in aws_cloudwatch_log_group.service : key => group.name }
}

output "log_stream_prefix" {
  description = "awslogs stream prefix: streams are PREFIX/CONTAINER/TASK_ID."
  value       = "ecs"
}

output "notebook_name" {
  description = "SageMaker notebook instance."
  value       = aws_sagemaker_notebook_instance.main.name
}

output "notebook_url" {
  description = "JupyterLab on the notebook instance (opens through the AWS console sign-in)."
  value       = "https://${aws_sagemaker_notebook_instance.main.url}/lab"
}

output "mlflow_secret_arns" {
  description = "Secrets Manager ARNs of the MLflow passwords (values are never output)."
  value       = { for key, secret in aws_secretsmanager_secret.mlflow : key => secret.arn }
}

output "model_name" {
  description = "Registered model."
  value       = var.model_name
}

output "github_images_role_arn" {
  description = "The role images.yml assumes (repository variable AWS_ROLE_ARN); empty without github_repository."
  value       = local.github ? aws_iam_role.github["images"].arn : ""
}

output "github_plan_role_arn" {
  description = "The role infra.yml's plan job assumes; empty without github_repository."
  value       = local.github ? aws_iam_role.github["plan"].arn : ""
}

output "batch_job_queue" {
  description = "AWS Batch job queue of the batch scoring jobs (hm-mlflow cloud predict)."
  value       = aws_batch_job_queue.predict.name
}

output "batch_job_definition" {
  description = "AWS Batch job definition of the batch scoring jobs."
  value       = aws_batch_job_definition.predict.name
}

output "batch_log_group" {
  description = "CloudWatch log group of the batch scoring jobs."
  value       = aws_cloudwatch_log_group.service["batch"].name
}

output "batch_input_uri" {
  description = "Where the batch scoring jobs may read films: s3://DATA_BUCKET/batch_input_prefix/."
  value       = "s3://${module.data_bucket.id}/${var.batch_input_prefix}/"
}

output "batch_output_uri" {
  description = "Where the batch scoring jobs may write results."
  value       = "s3://${module.data_bucket.id}/${var.batch_output_prefix}/"
}
