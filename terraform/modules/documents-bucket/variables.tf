variable "bucket_name" {
  description = "The documents bucket (invoice and credit note PDFs, receipts)"
  type        = string
}

variable "access_log_bucket" {
  description = "Bucket that receives the server access logs"
  type        = string
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept"
  type        = number
  default     = 365
}

variable "infrequent_access_after_days" {
  description = "Days after which documents move to STANDARD_IA (read rarely after the month they are issued)"
  type        = number
  default     = 90
}

variable "force_destroy" {
  description = "Allow terraform destroy to empty the bucket (dev only)"
  type        = bool
  default     = false
}

variable "tags" {
  type    = map(string)
  default = {}
}
