# The app's secrets in AWS Secrets Manager, read into the cluster by the External Secrets Operator
# (the chart's ExternalSecret extracts every property of the JSON secret). Terraform creates the
# secrets and their key, never their values (state would hold them): operators put the values with
#   aws secretsmanager put-secret-value --secret-id <prefix>/app --secret-string file://app.json
# (docs/runbooks/key-rotation.md). app.json holds DATABASE_URL, MIGRATION_DATABASE_URL,
# STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET and optionally SMTP_USERNAME, SMTP_PASSWORD.

resource "aws_kms_key" "secrets" {
  description             = "${var.prefix} secrets"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  tags                    = var.tags
}

resource "aws_secretsmanager_secret" "app" {
  name                    = "${var.prefix}/app"
  description             = "Roomly Billing settings that are secret (one JSON object)"
  kms_key_id              = aws_kms_key.secrets.arn
  recovery_window_in_days = var.recovery_window_days
  tags                    = var.tags
}

resource "aws_secretsmanager_secret" "auth_keys" {
  name                    = "${var.prefix}/auth-keys"
  description             = "Roomly Billing API signing keys (one property per key file)"
  kms_key_id              = aws_kms_key.secrets.arn
  recovery_window_in_days = var.recovery_window_days
  tags                    = var.tags
}

data "aws_iam_policy_document" "read" {
  statement {
    sid       = "ReadRoomlyBillingSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_secretsmanager_secret.app.arn, aws_secretsmanager_secret.auth_keys.arn]
  }
  statement {
    sid       = "DecryptRoomlyBillingSecrets"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.secrets.arn]
  }
}

resource "aws_iam_policy" "read" {
  name        = "${replace(var.prefix, "/", "-")}-secrets-read"
  description = "Read the Roomly Billing secrets (for the External Secrets Operator)"
  policy      = data.aws_iam_policy_document.read.json
  tags        = var.tags
}
