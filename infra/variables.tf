# Every variable has a default that gives a working platform; set what you change in
# terraform.tfvars (see terraform.tfvars.example).

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix of every resource name (cluster NAME-cluster, services NAME-mlflow-service, ...)."
  type        = string
  default     = "hm-mlflow"

  # RDS identifiers and parameter group names refuse a trailing dash and two dashes in a row.
  validation {
    condition     = length(var.name) <= 16 && can(regex("^[a-z]([a-z0-9]|-[a-z0-9])+$", var.name))
    error_message = "name: 2-16 lower-case letters, digits and single dashes, starting with a letter and not ending with a dash."
  }
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

# --- Names and access ------------------------------------------------------------------------

variable "domain" {
  description = "Domain of the two host names: mlflow.DOMAIN (MLflow) and app.DOMAIN (webapp). A Route 53 private zone of this name resolves them inside the VPC. The default is under .internal, the suffix kept for private use; a name under .local (the seed's hm-mlflow.local) is accepted, but RFC 6762 gives .local to multicast DNS and resolvers that follow it (systemd-resolved, macOS) may not ask the VPC's resolver."
  type        = string
  default     = "hm-mlflow.internal"
}

variable "public_zone_id" {
  description = "Optional: id of a Route 53 public hosted zone for DOMAIN that you own; mlflow.DOMAIN and app.DOMAIN are then published there, pointing at the public load balancer."
  type        = string
  default     = ""
}

variable "certificate_arn" {
  description = "Optional: ACM certificate covering mlflow.DOMAIN and app.DOMAIN. Given, the public load balancer serves HTTPS and redirects HTTP; empty, it serves HTTP."
  type        = string
  default     = ""
}

variable "allowed_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the public load balancer (your office or home address, e.g. [\"203.0.113.7/32\"]). Empty: reachable from inside the VPC only."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for cidr in var.allowed_cidrs : can(cidrhost(cidr, 0))])
    error_message = "allowed_cidrs: each entry must be an IPv4 CIDR block such as 203.0.113.7/32."
  }
}

variable "mlflow_auth" {
  description = "MLflow basic authentication: an admin, and users webapp (read the model), trainer and notebook (runs and versions), passwords in Secrets Manager."
  type        = bool
  default     = true
}

# --- Network -------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR block of the VPC; public and private subnets are carved out of it."
  type        = string
  default     = "10.42.0.0/16"
}

variable "az_count" {
  description = "Availability zones to spread subnets and tasks over (at least 2: the load balancers need two)."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count: between 2 and 4."
  }
}

variable "egress" {
  description = "How private subnets reach AWS APIs and the internet: \"nat\" (a NAT gateway; pip and PyPI work from the notebook) or \"endpoints\" (VPC endpoints for S3, ECR, CloudWatch Logs, Secrets Manager, STS and ECS; no NAT cost, no internet)."
  type        = string
  default     = "nat"

  validation {
    condition     = contains(["nat", "endpoints"], var.egress)
    error_message = "egress: \"nat\" or \"endpoints\"."
  }
}

variable "flow_logs" {
  description = "Record the VPC's rejected traffic in CloudWatch Logs."
  type        = bool
  default     = true
}

# --- Images and tasks --------------------------------------------------------------------------

variable "image_tag" {
  description = "Tag of the three images in ECR (tags are immutable: push a new tag, then apply)."
  type        = string
  default     = "0.1.0"
}

variable "mlflow_cpu" {
  description = "CPU units of an MLflow server task (1024 = 1 vCPU)."
  type        = number
  default     = 512
}

variable "mlflow_memory" {
  description = "Memory of an MLflow server task, MiB."
  type        = number
  default     = 1024
}

variable "mlflow_desired_count" {
  description = "MLflow server tasks."
  type        = number
  default     = 1
}

variable "webapp_cpu" {
  description = "CPU units of a webapp task."
  type        = number
  default     = 512
}

variable "webapp_memory" {
  description = "Memory of a webapp task, MiB."
  type        = number
  default     = 1024
}

variable "webapp_min_tasks" {
  description = "Fewest webapp tasks (2 keeps one in each of two zones)."
  type        = number
  default     = 2
}

variable "webapp_max_tasks" {
  description = "Most webapp tasks the autoscaler may run."
  type        = number
  default     = 6
}

variable "webapp_requests_per_target" {
  description = "Requests per webapp task per minute that the autoscaler aims for."
  type        = number
  default     = 1200
}

variable "monitor_schedule" {
  description = "When EventBridge Scheduler runs the monitor task (hm-mlflow monitor --retrain-on-drift)."
  type        = string
  default     = "rate(1 day)"
}

variable "monitor_cpu" {
  description = "CPU units of the monitor task."
  type        = number
  default     = 512
}

variable "monitor_memory" {
  description = "Memory (MiB) of the monitor task."
  type        = number
  default     = 1024
}

variable "training_cpu" {
  description = "CPU units of the training task."
  type        = number
  default     = 2048
}

variable "training_memory" {
  description = "Memory of the training task, MiB."
  type        = number
  default     = 8192
}

variable "data_prefix" {
  description = "Prefix in the data bucket that holds the Kaggle layout (train/ val/ test/)."
  type        = string
  default     = "chest_xray"
}

variable "model_name" {
  description = "Registered model in MLflow."
  type        = string
  default     = "chest-xray-pneumonia"
}

variable "experiment" {
  description = "MLflow experiment of the training runs."
  type        = string
  default     = "chest-xray"
}

variable "refresh_seconds" {
  description = "How often the webapp checks which version holds the Production alias."
  type        = number
  default     = 30
}

# --- Database, storage, logs -------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class of MLflow's backend store."
  type        = string
  default     = "db.t4g.micro"
}

variable "db_allocated_storage" {
  description = "RDS storage, GiB."
  type        = number
  default     = 20
}

variable "db_multi_az" {
  description = "A standby database in a second zone (doubles the database cost)."
  type        = bool
  default     = false
}

variable "protect_data" {
  description = "Deletion protection on the database, a final snapshot, and no deletion of non-empty buckets or repositories. Set false (and apply) before terraform destroy."
  type        = bool
  default     = true
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps the tasks' logs."
  type        = number
  default     = 365
}

variable "password_version" {
  description = "Generation of the database passwords (the MLflow database's master password, the prediction log role's): raise it by one and apply to draw both anew, then deploy the services again (README, \"Passwords\"). Nothing rotates them otherwise."
  type        = number
  default     = 1
}

variable "secret_recovery_days" {
  description = "Days a deleted secret can still be restored while protect_data is true (0 deletes at once). With protect_data = false secrets are deleted at once, so that a destroy can be followed by a new deployment of the same name."
  type        = number
  default     = 7
}

# --- Notebook ------------------------------------------------------------------------------------

variable "notebook_instance_type" {
  description = "SageMaker notebook instance type."
  type        = string
  default     = "ml.t3.medium"
}

variable "notebook_platform" {
  description = "Platform of the notebook instance: Amazon Linux 2023 (Amazon Linux 2 reached its end of support in June 2026). Provider 6.x knows notebook-al2023-v1; 5.x knew only the notebook-al2-* platforms."
  type        = string
  default     = "notebook-al2023-v1"
}

variable "notebook_volume_gb" {
  description = "Storage of the notebook instance, GiB."
  type        = number
  default     = 20
}

# --- GitHub Actions (github.tf) ------------------------------------------------------------------

variable "github_repository" {
  description = "Optional: \"OWNER/NAME\" of the GitHub repository whose workflows may push images (images.yml) and plan (infra.yml) through GitHub's OIDC provider. Empty: no GitHub access."
  type        = string
  default     = ""
  validation {
    condition     = var.github_repository == "" || can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository is OWNER/NAME, e.g. \"octo-org/hm-mlflow\"."
  }
}

variable "github_oidc_provider_arn" {
  description = "Optional: ARN of an existing token.actions.githubusercontent.com OIDC provider (an account has at most one); empty: github.tf creates it."
  type        = string
  default     = ""
}

variable "github_state_bucket" {
  description = "Optional: the S3 bucket holding this configuration's Terraform state, which the plan role may read."
  type        = string
  default     = ""
}

# --- Batch scoring (AWS Batch) -----------------------------------------------------------------

variable "batch_input_prefix" {
  description = "Prefix of the data bucket the batch scoring jobs may read films from (no slashes at the ends)."
  type        = string
  default     = "archive"
}

variable "batch_output_prefix" {
  description = "Prefix of the data bucket the batch scoring jobs may write results to (no slashes at the ends)."
  type        = string
  default     = "scores"
}

variable "batch_vcpus" {
  description = "vCPUs of one batch scoring child (Fargate: 0.25, 0.5, 1, 2, 4, ...)."
  type        = number
  default     = 2
}

variable "batch_memory" {
  description = "Memory of one batch scoring child, MiB (a valid Fargate size for batch_vcpus)."
  type        = number
  default     = 4096
}

variable "batch_max_vcpus" {
  description = "vCPUs the compute environment runs at most at once (children at a time = this / batch_vcpus)."
  type        = number
  default     = 32
}

variable "batch_timeout_seconds" {
  description = "Longest a batch scoring child may run before AWS Batch stops it."
  type        = number
  default     = 21600
}
