variable "prefix" {
  description = "Secret name prefix, e.g. roomly-billing/prod (the chart's secrets.externalSecret.remoteKey is <prefix>/app)"
  type        = string
}

variable "recovery_window_days" {
  description = "Days a deleted secret can still be restored"
  type        = number
  default     = 30
}

variable "tags" {
  type    = map(string)
  default = {}
}
