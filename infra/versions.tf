# hm-mlflow on AWS: ECS Fargate behind Application Load Balancers, RDS PostgreSQL, S3, ECR,
# Route 53, Secrets Manager and a SageMaker notebook instance. See README.md, "On AWS".

terraform {
  # 1.11: ephemeral resources and write-only arguments keep every password out of the state.
  required_version = ">= 1.11"

  # 6.x: the notebook's Amazon Linux 2023 platform. The blocks are checked against 6.66's schema,
  # and the real provider 5.100 validates and plans them (tests/test_infra_provider.py).
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0, < 7.0"
    }
  }

  # The state holds no password (secrets.tf), but names, ARNs and addresses of everything. Keep
  # it in an encrypted, access-controlled backend, e.g.:
  #   backend "s3" {
  #     bucket       = "my-terraform-state"
  #     key          = "hm-mlflow/terraform.tfstate"
  #     region       = "eu-west-1"
  #     encrypt      = true
  #     use_lockfile = true
  #   }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ Project = var.name, ManagedBy = "terraform" }, var.tags)
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Zones are taken by position (the first az_count), so a zone AWS adds later does not change the set; pinning zone names would tie the code to one region
  state = "available"
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = var.region
  azs        = slice(data.aws_availability_zones.available.names, 0, var.az_count)

  # The two servers behind the load balancers: host name under var.domain, container port and
  # the path the target groups and container health checks probe.
  services = {
    mlflow = { host = "mlflow", port = 5000, health_path = "/health" }
    webapp = { host = "app", port = 8080, health_path = "/health" }
  }
  mlflow_host = "${local.services.mlflow.host}.${var.domain}"
  app_host    = "${local.services.webapp.host}.${var.domain}"
  # Inside the VPC every client reaches MLflow through the internal load balancer, by name.
  mlflow_internal_url = "http://${local.mlflow_host}"
  https               = var.certificate_arn != ""
  public_scheme       = local.https ? "https" : "http"
}
