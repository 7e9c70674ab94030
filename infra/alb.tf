# Two Application Load Balancers with the same host-based routing:
#
#   public    internet-facing, in the public subnets, open to var.allowed_cidrs only: people's
#             browsers and laptops. HTTPS when var.certificate_arn is set (HTTP redirects).
#   internal  in the private subnets: the webapp, the training task and the notebook reach MLflow
#             (and the webapp) by name without leaving the VPC. The private zone (dns.tf) points
#             mlflow.DOMAIN and app.DOMAIN here. Sending that traffic to the public load balancer
#             instead would take it out through the NAT gateway and back in, past the CIDR list.
#
# On both: mlflow.DOMAIN -> the MLflow service, app.DOMAIN -> the webapp, anything else -> 404.
# The idle timeout (60 s) is shorter than the servers' keep-alive (75 s, ecs.tf), so a load
# balancer never reuses a connection the server is closing (sporadic 502s otherwise).

locals {
  load_balancers = {
    public   = { internal = false, subnets = aws_subnet.public[*].id, security_group = "alb_public" }
    internal = { internal = true, subnets = aws_subnet.private[*].id, security_group = "alb_internal" }
  }
  idle_timeout_seconds = 60

  # One target group per load balancer and service: "public-mlflow", "internal-webapp", ...
  targets = {
    for pair in setproduct(keys(local.load_balancers), keys(local.services)) :
    "${pair[0]}-${pair[1]}" => { load_balancer = pair[0], service = pair[1] }
  }

  # Target group name prefixes, "mlpub-", "apint-", ...: service, then load balancer.
  target_prefixes = {
    for key, target in local.targets :
    key => "${substr(local.services[target.service].host, 0, 2)}${substr(target.load_balancer, 0, 3)}-"
  }

  # The target groups of each service, one per load balancer.
  service_targets = {
    for service in keys(local.services) :
    service => { for key, target in local.targets : key => target if target.service == service }
  }

  # The listener that carries the host rules on each load balancer.
  routing_listener_arn = {
    public   = local.https ? aws_lb_listener.public_https[0].arn : aws_lb_listener.public_http[0].arn
    internal = aws_lb_listener.internal_http.arn
  }
}

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:Access logs need a separate SSE-S3 bucket whose policy names the region's ELB account; request counts, errors and latency are in CloudWatch's ALB metrics
  #checkov:skip=CKV2_AWS_28:Ingress is limited to var.allowed_cidrs and MLflow requires basic auth; add an aws_wafv2_web_acl_association before opening allowed_cidrs to the internet
  #checkov:skip=CKV2_AWS_20:The public listener redirects HTTP to HTTPS when certificate_arn is set; the internal one serves names of a private zone, for which no public certificate exists, inside the VPC
  for_each = local.load_balancers

  name               = "${var.name}-${each.key}"
  load_balancer_type = "application"
  internal           = each.value.internal
  subnets            = each.value.subnets
  security_groups    = [aws_security_group.this[each.value.security_group].id]

  idle_timeout               = local.idle_timeout_seconds
  drop_invalid_header_fields = true
  enable_deletion_protection = var.protect_data
}

resource "aws_lb_target_group" "this" {
  #checkov:skip=CKV_AWS_378:Load balancer to task traffic stays in the private subnets; TLS ends at the load balancer, the containers serve plain HTTP
  for_each = local.targets

  # A replacement (a new port, protocol or target type) is made before the group in use goes,
  # which a fixed name forbids: a prefix (AWS allows 6 characters) and the full name as a tag.
  name_prefix = local.target_prefixes[each.key]
  target_type = "ip"
  vpc_id      = aws_vpc.main.id
  protocol    = "HTTP"
  port        = local.services[each.value.service].port

  deregistration_delay = 30

  health_check {
    path                = local.services[each.value.service].health_path
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }

  tags = { Name = "${var.name}-${each.key}" }

  lifecycle {
    create_before_destroy = true
  }
}

# --- Listeners ------------------------------------------------------------------------------

resource "aws_lb_listener" "public_https" {
  count = local.https ? 1 : 0

  load_balancer_arn = aws_lb.this["public"].arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not found: use ${local.mlflow_host} or ${local.app_host}"
      status_code  = "404"
    }
  }
}

# Without a certificate: plain HTTP, carrying the host rules below.
resource "aws_lb_listener" "public_http" {
  count = local.https ? 0 : 1

  #checkov:skip=CKV_AWS_2:Only created without certificate_arn, when plain HTTP is the chosen mode (ingress limited to allowed_cidrs)
  #checkov:skip=CKV_AWS_103:Same listener: TLS applies to the HTTPS listener (TLS 1.2+ policy) created with certificate_arn
  load_balancer_arn = aws_lb.this["public"].arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not found: use ${local.mlflow_host} or ${local.app_host}"
      status_code  = "404"
    }
  }
}

# With a certificate: port 80 only redirects to HTTPS.
resource "aws_lb_listener" "public_redirect" {
  count = local.https ? 1 : 0

  load_balancer_arn = aws_lb.this["public"].arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

resource "aws_lb_listener" "internal_http" {
  #checkov:skip=CKV_AWS_2:Internal listener for names of a private zone (no public certificate can exist); traffic never leaves the VPC
  #checkov:skip=CKV_AWS_103:Same listener: no TLS for traffic that stays inside the VPC
  load_balancer_arn = aws_lb.this["internal"].arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not found: use ${local.mlflow_host} or ${local.app_host}"
      status_code  = "404"
    }
  }
}

# --- Host rules: mlflow.DOMAIN -> MLflow, app.DOMAIN -> webapp, on both load balancers ----------

resource "aws_lb_listener_rule" "host" {
  for_each = local.targets

  listener_arn = local.routing_listener_arn[each.value.load_balancer]
  priority     = each.value.service == "mlflow" ? 10 : 20

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this[each.key].arn
  }

  condition {
    host_header {
      values = ["${local.services[each.value.service].host}.${var.domain}"]
    }
  }
}
