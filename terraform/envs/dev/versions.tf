terraform {
  required_version = ">= 1.6"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.80"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.17"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.35"
    }
  }
  # State in S3 with locking; bucket and table given at init:
  #   terraform init -backend-config=bucket=roomly-terraform-state -backend-config=dynamodb_table=roomly-terraform-locks
  backend "s3" {
    key     = "roomly-billing/dev/terraform.tfstate"
    region  = "eu-central-1"
    encrypt = true
  }
}
