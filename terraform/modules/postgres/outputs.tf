output "primary_endpoint" {
  description = "host:port of the primary (DATABASE_URL, MIGRATION_DATABASE_URL)"
  value       = aws_db_instance.primary.endpoint
}

output "replica_endpoint" {
  description = "host:port of the read replica (DATABASE_REPLICA_URL); null without one"
  value       = var.replica_enabled ? aws_db_instance.replica[0].endpoint : null
}

output "master_user_secret_arn" {
  description = "The Secrets Manager secret RDS keeps the owner's password in"
  value       = aws_db_instance.primary.master_user_secret[0].secret_arn
}

output "kms_key_arn" {
  value = aws_kms_key.db.arn
}

output "security_group_id" {
  value = aws_security_group.db.id
}
