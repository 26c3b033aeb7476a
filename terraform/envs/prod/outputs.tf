output "database_endpoint" {
  value = module.postgres.primary_endpoint
}

output "database_replica_endpoint" {
  value = module.postgres.replica_endpoint
}

output "database_owner_secret_arn" {
  description = "RDS keeps the owner's password here; MIGRATION_DATABASE_URL is built from it"
  value       = module.postgres.master_user_secret_arn
}

output "documents_bucket" {
  value = module.documents.bucket
}

output "app_secret_name" {
  description = "helm values: secrets.externalSecret.remoteKey"
  value       = module.secrets.app_secret_name
}

output "cluster_secret_store" {
  value = module.addons.cluster_secret_store
}

output "database_security_group_id" {
  description = "For a point-in-time restore (docs/runbooks/restore-from-backup.md)"
  value       = module.postgres.security_group_id
}
