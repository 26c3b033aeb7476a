output "app_secret_name" {
  description = "The chart's secrets.externalSecret.remoteKey"
  value       = aws_secretsmanager_secret.app.name
}

output "auth_keys_secret_name" {
  value = aws_secretsmanager_secret.auth_keys.name
}

output "read_policy_arn" {
  description = "Attach to the External Secrets Operator's role"
  value       = aws_iam_policy.read.arn
}
