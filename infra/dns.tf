# Names. A Route 53 private hosted zone for var.domain, attached to the VPC, answers
# mlflow.DOMAIN and app.DOMAIN with the internal load balancer: the notebook instance and the
# tasks reach both servers by name, inside the VPC, with no hosts-file edit.
#
# From a laptop: with var.public_zone_id (a public zone of var.domain that you own) the same
# names are published there for the public load balancer; otherwise use one hosts-file line or a
# Host header (README.md, "Reaching the UIs"). A private zone with the same name as a public
# domain answers NXDOMAIN inside the VPC for names it does not hold: only mlflow and app are
# served from it.

resource "aws_route53_zone" "private" {
  name          = var.domain
  comment       = "${var.name}: MLflow and the webapp inside the VPC"
  force_destroy = true

  vpc {
    vpc_id = aws_vpc.main.id
  }
}

resource "aws_route53_record" "private" {
  for_each = local.services

  zone_id = aws_route53_zone.private.zone_id
  name    = "${each.value.host}.${var.domain}"
  type    = "A"

  alias {
    name                   = aws_lb.this["internal"].dns_name
    zone_id                = aws_lb.this["internal"].zone_id
    evaluate_target_health = false
  }
}

resource "aws_route53_record" "public" {
  for_each = var.public_zone_id != "" ? local.services : {}

  zone_id = var.public_zone_id
  name    = "${each.value.host}.${var.domain}"
  type    = "A"

  alias {
    name                   = aws_lb.this["public"].dns_name
    zone_id                = aws_lb.this["public"].zone_id
    evaluate_target_health = false
  }
}
