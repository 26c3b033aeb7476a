output "external_secrets_role_arn" {
  value = aws_iam_role.external_secrets.arn
}

output "cluster_secret_store" {
  description = "The chart's secrets.externalSecret.storeRef.name"
  value       = kubernetes_manifest.cluster_secret_store.manifest.metadata.name
}
