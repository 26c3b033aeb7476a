# Roomly Billing, dev: PostgreSQL (primary, no replica in dev), the documents bucket, the
# secrets, and the cluster add-ons the Helm chart expects (helm/roomly-billing/values-dev.yaml).

locals {
  name = "roomly-billing-dev"
  tags = {
    project     = "roomly-billing"
    environment = "dev"
    managed-by  = "terraform"
  }
}

module "postgres" {
  source = "../../modules/postgres"

  name                   = local.name
  vpc_id                 = var.vpc_id
  subnet_ids             = var.private_subnet_ids
  allowed_cidr_blocks    = var.cluster_cidr_blocks
  instance_class         = "db.t4g.small"
  replica_instance_class = "db.t4g.small"
  multi_az               = false
  backup_retention_days  = 7
  deletion_protection    = false
  replica_enabled        = false
  tags                   = local.tags
}

module "documents" {
  source = "../../modules/documents-bucket"

  bucket_name       = "${local.name}-documents"
  access_log_bucket = var.access_log_bucket
  force_destroy     = true
  tags              = local.tags
}

module "secrets" {
  source = "../../modules/secrets"

  prefix               = "roomly-billing/dev"
  recovery_window_days = 7
  tags                 = local.tags
}

module "addons" {
  source = "../../modules/cluster-addons"

  cluster_name            = var.cluster_name
  oidc_provider_arn       = var.oidc_provider_arn
  oidc_provider_url       = var.oidc_provider_url
  secrets_read_policy_arn = module.secrets.read_policy_arn
  aws_region              = var.aws_region
  acme_email              = var.acme_email
  tags                    = local.tags
}
