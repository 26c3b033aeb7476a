variable "name" {
  description = "Identifier prefix, e.g. roomly-billing-prod"
  type        = string
}

variable "vpc_id" {
  description = "VPC of the database and the cluster"
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets in at least two availability zones"
  type        = list(string)
}

variable "allowed_cidr_blocks" {
  description = "Who may connect on 5432: the cluster's pod/node CIDRs"
  type        = list(string)
}

variable "engine_version" {
  description = "PostgreSQL major.minor"
  type        = string
  default     = "16.6"
}

variable "instance_class" {
  type    = string
  default = "db.t4g.medium"
}

variable "replica_instance_class" {
  description = "Class of the read replica (reports and read-only routes)"
  type        = string
  default     = "db.t4g.medium"
}

variable "allocated_storage" {
  description = "GiB at creation; storage grows up to max_allocated_storage"
  type        = number
  default     = 50
}

variable "max_allocated_storage" {
  type    = number
  default = 500
}

variable "multi_az" {
  description = "A synchronous standby in another zone (prod)"
  type        = bool
  default     = true
}

variable "backup_retention_days" {
  description = "Daily automated snapshots kept this many days; point-in-time recovery within the same window"
  type        = number
  default     = 14
  validation {
    condition     = var.backup_retention_days >= 7 && var.backup_retention_days <= 35
    error_message = "backup_retention_days must be 7-35 (RDS allows at most 35)."
  }
}

variable "deletion_protection" {
  description = "Refuse deletion of the primary (on in prod)"
  type        = bool
  default     = true
}

variable "replica_enabled" {
  type    = bool
  default = true
}

variable "tags" {
  type    = map(string)
  default = {}
}
