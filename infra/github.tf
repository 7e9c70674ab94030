# GitHub Actions into this account without stored keys (.github/workflows/): with
# var.github_repository set ("OWNER/NAME"), GitHub's OIDC provider and two roles that only
# workflows of that repository can assume:
#
#   NAME-github-images  images.yml on main or a v* tag: push the three images to their ECR
#                       repositories, nothing else
#   NAME-github-plan    infra.yml: read the account and the Terraform state to plan (AWS's
#                       ReadOnlyAccess plus the state bucket); it cannot change anything
#
# Then set the repository variables AWS_ROLE_ARN (output github_images_role_arn),
# AWS_PLAN_ROLE_ARN (output github_plan_role_arn), AWS_REGION and TF_STATE_BUCKET.
# An account that has the provider already passes github_oidc_provider_arn instead.

locals {
  github           = var.github_repository != ""
  github_oidc_host = "token.actions.githubusercontent.com"
  github_oidc_arn = local.github ? (
    var.github_oidc_provider_arn != "" ? var.github_oidc_provider_arn : aws_iam_openid_connect_provider.github[0].arn
  ) : ""
}

resource "aws_iam_openid_connect_provider" "github" {
  count          = local.github && var.github_oidc_provider_arn == "" ? 1 : 0
  url            = "https://${local.github_oidc_host}"
  client_id_list = ["sts.amazonaws.com"]
  # AWS trusts GitHub's certificate authority itself; the thumbprint is kept for the API
  thumbprint_list = ["6938fd4d98bab03faadb97b34396831e3780aea1"]
}

data "aws_iam_policy_document" "github_trust" {
  for_each = local.github ? {
    images = ["repo:${var.github_repository}:ref:refs/heads/main", "repo:${var.github_repository}:ref:refs/tags/v*"]
    plan   = ["repo:${var.github_repository}:*"]
  } : {}
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [local.github_oidc_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.github_oidc_host}:aud"
      values   = ["sts.amazonaws.com"]
    }
    condition {
      test     = "StringLike"
      variable = "${local.github_oidc_host}:sub"
      values   = each.value
    }
  }
}

resource "aws_iam_role" "github" {
  for_each             = data.aws_iam_policy_document.github_trust
  name                 = "${var.name}-github-${each.key}"
  assume_role_policy   = each.value.json
  max_session_duration = 3600
}

data "aws_iam_policy_document" "github_images" {
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # GetAuthorizationToken has no resource-level permissions
  }
  statement {
    sid = "PushImages"
    actions = [
      "ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:CompleteLayerUpload",
      "ecr:GetDownloadUrlForLayer", "ecr:InitiateLayerUpload", "ecr:PutImage", "ecr:UploadLayerPart",
    ]
    resources = [for repo in aws_ecr_repository.this : repo.arn]
  }
}

resource "aws_iam_role_policy" "github_images" {
  count  = local.github ? 1 : 0
  name   = "push-images"
  role   = aws_iam_role.github["images"].id
  policy = data.aws_iam_policy_document.github_images.json
}

resource "aws_iam_role_policy_attachment" "github_plan_read_only" {
  count      = local.github ? 1 : 0
  role       = aws_iam_role.github["plan"].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/ReadOnlyAccess"
}

data "aws_iam_policy_document" "github_plan_state" {
  count = local.github && var.github_state_bucket != "" ? 1 : 0
  statement {
    sid       = "ReadState"
    actions   = ["s3:GetObject", "s3:ListBucket"]
    resources = ["arn:${local.partition}:s3:::${var.github_state_bucket}", "arn:${local.partition}:s3:::${var.github_state_bucket}/*"]
  }
}

resource "aws_iam_role_policy" "github_plan_state" {
  count  = local.github && var.github_state_bucket != "" ? 1 : 0
  name   = "read-terraform-state"
  role   = aws_iam_role.github["plan"].id
  policy = data.aws_iam_policy_document.github_plan_state[0].json
}
