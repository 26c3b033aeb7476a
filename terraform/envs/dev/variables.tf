variable "aws_region" {
  type    = string
  default = "eu-central-1"
}

variable "cluster_name" {
  description = "The EKS cluster of dev (made outside this repository)"
  type        = string
}

variable "vpc_id" {
  type = string
}

variable "private_subnet_ids" {
  description = "Private subnets of the database, in at least two zones"
  type        = list(string)
}

variable "cluster_cidr_blocks" {
  description = "CIDRs of the cluster's nodes and pods (the chart's networkPolicy.egress.database.cidrs side)"
  type        = list(string)
}

variable "oidc_provider_arn" {
  type = string
}

variable "oidc_provider_url" {
  type = string
}

variable "access_log_bucket" {
  description = "Existing bucket for S3 server access logs"
  type        = string
}

variable "acme_email" {
  type    = string
  default = "platform@roomly.io"
}
