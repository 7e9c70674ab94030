# One customer-managed key encrypts what the platform stores: S3 objects, the database, the
# secrets, the logs, the images and the notebook's volume. Rotated yearly.

resource "aws_kms_key" "main" {
  description             = "${var.name}: data, artifacts, database, secrets, logs, images"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's resource "*" means this key only; administration is limited to the account's IAM
  #checkov:skip=CKV_AWS_111:Same: a key policy's resource is the key itself
  #checkov:skip=CKV_AWS_356:Same: a key policy's resource is the key itself
  # The account administers the key; every other use is granted by IAM policies (iam.tf) or
  # through the AWS services that act for a caller (S3, RDS, Secrets Manager, ECR, SageMaker).
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  # CloudWatch Logs encrypts this project's log groups with the key, and nothing else.
  statement {
    sid       = "CloudWatchLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"] # in a key policy, "*" is this key
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"]
    }
  }
}
