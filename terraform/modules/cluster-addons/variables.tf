variable "cluster_name" {
  type = string
}

variable "oidc_provider_arn" {
  description = "The cluster's IAM OIDC provider (IRSA)"
  type        = string
}

variable "oidc_provider_url" {
  description = "Its issuer URL without https://"
  type        = string
}

variable "secrets_read_policy_arn" {
  description = "IAM policy that reads the app's secrets (secrets module)"
  type        = string
}

variable "aws_region" {
  type = string
}

variable "acme_email" {
  description = "Contact of the Let's Encrypt account"
  type        = string
}

variable "ingress_replicas" {
  type    = number
  default = 2
}

variable "prometheus_retention" {
  type    = string
  default = "15d"
}

# Pinned chart versions (upgrade deliberately, one at a time).
variable "chart_versions" {
  type = object({
    cert_manager          = string
    ingress_nginx         = string
    external_secrets      = string
    sealed_secrets        = string
    kube_prometheus_stack = string
    prometheus_adapter    = string
  })
  default = {
    cert_manager          = "v1.16.2"
    ingress_nginx         = "4.11.3"
    external_secrets      = "0.17.0"
    sealed_secrets        = "2.16.2"
    kube_prometheus_stack = "66.3.1"
    prometheus_adapter    = "4.11.0"
  }
}

variable "schedule_to_start_series" {
  description = "The worker's histogram of activity schedule-to-start latency, in seconds (Temporal SDK)"
  type        = string
  default     = "temporal_activity_schedule_to_start_latency_seconds_bucket"
}

variable "schedule_to_start_metric" {
  description = "The per-pod metric served to the worker's HPA (the chart's worker.autoscaling.scheduleToStart.metric)"
  type        = string
  default     = "temporal_activity_schedule_to_start_seconds_p95"
}

variable "tags" {
  type    = map(string)
  default = {}
}
