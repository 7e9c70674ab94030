# Security groups: one per part of the platform, rules only where a connection is needed.
# From outside the VPC, only the public load balancer accepts traffic, on its listener ports and
# from var.allowed_cidrs. Everything else accepts connections from named security groups only.

locals {
  security_groups = {
    alb_public   = "Public load balancer: HTTP(S) from the allowed CIDR blocks"
    alb_internal = "Internal load balancer: HTTP from the tasks and the notebook instance"
    mlflow       = "MLflow server tasks"
    webapp       = "Webapp tasks"
    training     = "Training tasks"
    monitor      = "Monitor tasks (the daily schedule)"
    batch        = "Batch scoring jobs (AWS Batch on Fargate)"
    notebook     = "SageMaker notebook instance"
    database     = "RDS PostgreSQL, MLflow's backend store"
    endpoints    = "VPC interface endpoints"
  }

  # Connections between the platform's parts: `group` accepts `port` from `source`. Each entry
  # gives the ingress rule on `group` and the matching egress rule on `source`.
  connections = {
    alb-internal-from-webapp   = { group = "alb_internal", port = 80, source = "webapp" }
    alb-internal-from-training = { group = "alb_internal", port = 80, source = "training" }
    alb-internal-from-notebook = { group = "alb_internal", port = 80, source = "notebook" }
    alb-internal-from-monitor  = { group = "alb_internal", port = 80, source = "monitor" }
    alb-internal-from-batch    = { group = "alb_internal", port = 80, source = "batch" }
    mlflow-from-alb-public     = { group = "mlflow", port = local.services.mlflow.port, source = "alb_public" }
    mlflow-from-alb-internal   = { group = "mlflow", port = local.services.mlflow.port, source = "alb_internal" }
    webapp-from-alb-public     = { group = "webapp", port = local.services.webapp.port, source = "alb_public" }
    webapp-from-alb-internal   = { group = "webapp", port = local.services.webapp.port, source = "alb_internal" }
    database-from-mlflow       = { group = "database", port = 5432, source = "mlflow" }
    # The prediction log (its own database on the same instance)
    database-from-webapp   = { group = "database", port = 5432, source = "webapp" }
    database-from-training = { group = "database", port = 5432, source = "training" }
    database-from-monitor  = { group = "database", port = 5432, source = "monitor" }
    database-from-batch    = { group = "database", port = 5432, source = "batch" }
  }

  # The listener ports of the public load balancer, open to each allowed CIDR block.
  public_ports = local.https ? [80, 443] : [80]
  public_ingress = {
    for pair in setproduct(local.public_ports, var.allowed_cidrs) :
    "${pair[0]}-${pair[1]}" => { port = pair[0], cidr = pair[1] }
  }

  # HTTPS out, to AWS APIs (ECR, S3, CloudWatch Logs, Secrets Manager) through the NAT gateway
  # or the VPC endpoints, and to PyPI from the notebook instance.
  https_egress = toset(["mlflow", "webapp", "training", "notebook", "monitor", "batch"])
}

resource "aws_security_group" "this" {
  #checkov:skip=CKV2_AWS_5:Checkov does not follow for_each references; every group is attached (tests/test_infra_wiring.py asserts it)
  for_each = local.security_groups

  # A prefix, not a name: create_before_destroy makes the new group before the old one goes, and
  # two groups of one name cannot exist in a VPC.
  name_prefix = "${var.name}-${replace(each.key, "_", "-")}-"
  description = each.value
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-${replace(each.key, "_", "-")}" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "connection" {
  #checkov:skip=CKV_AWS_260:The source is a security group (referenced_security_group_id), never a CIDR block; checkov reads the absent cidr_ipv4 as 0.0.0.0/0
  for_each = local.connections

  description                  = "${each.key}: port ${each.value.port} from ${each.value.source}"
  security_group_id            = aws_security_group.this[each.value.group].id
  referenced_security_group_id = aws_security_group.this[each.value.source].id
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
}

resource "aws_vpc_security_group_egress_rule" "connection" {
  for_each = local.connections

  description                  = "${each.key}: port ${each.value.port} to ${each.value.group}"
  security_group_id            = aws_security_group.this[each.value.source].id
  referenced_security_group_id = aws_security_group.this[each.value.group].id
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
}

resource "aws_vpc_security_group_ingress_rule" "public" {
  for_each = local.public_ingress

  description       = "Public load balancer: port ${each.value.port} from an allowed CIDR block"
  security_group_id = aws_security_group.this["alb_public"].id
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
}

resource "aws_vpc_security_group_ingress_rule" "endpoints" {
  description       = "VPC interface endpoints: HTTPS from inside the VPC"
  security_group_id = aws_security_group.this["endpoints"].id
  cidr_ipv4         = aws_vpc.main.cidr_block
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = local.https_egress

  description       = "${each.key}: HTTPS to AWS APIs (and PyPI from the notebook)"
  security_group_id = aws_security_group.this[each.key].id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}
