# The cluster add-ons the roomly-billing chart expects: ingress-nginx (its Ingress and canary),
# cert-manager (TLS, ClusterIssuer letsencrypt-prod/-staging), External Secrets (ExternalSecret,
# ClusterSecretStore aws-secrets-manager, IRSA), Sealed Secrets (dev), kube-prometheus-stack
# (ServiceMonitor, Prometheus, Alertmanager, Grafana) and prometheus-adapter (the worker HPA's
# schedule-to-start metric).
#
# The ClusterIssuers and the ClusterSecretStore are custom resources: their CRDs must exist when
# they are planned, so a new cluster is applied twice (docs/deployment.md "A new cluster"):
#   terraform apply -target=module.addons.helm_release.cert_manager -target=module.addons.helm_release.external_secrets
#   terraform apply

resource "helm_release" "ingress_nginx" {
  name             = "ingress-nginx"
  repository       = "https://kubernetes.github.io/ingress-nginx"
  chart            = "ingress-nginx"
  version          = var.chart_versions.ingress_nginx
  namespace        = "ingress-nginx"
  create_namespace = true
  atomic           = true

  values = [yamlencode({
    controller = {
      replicaCount = var.ingress_replicas
      config = {
        use-forwarded-headers     = "true"
        enable-modsecurity        = "false"
        allow-snippet-annotations = "false"
      }
      metrics = { enabled = true, serviceMonitor = { enabled = true, additionalLabels = { release = "kube-prometheus-stack" } } }
      service = {
        annotations = {
          "service.beta.kubernetes.io/aws-load-balancer-type"            = "nlb"
          "service.beta.kubernetes.io/aws-load-balancer-scheme"          = "internet-facing"
          "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type" = "ip"
        }
      }
      topologySpreadConstraints = [{
        maxSkew           = 1
        topologyKey       = "topology.kubernetes.io/zone"
        whenUnsatisfiable = "ScheduleAnyway"
        labelSelector     = { matchLabels = { "app.kubernetes.io/name" = "ingress-nginx", "app.kubernetes.io/component" = "controller" } }
      }]
    }
  })]
}

resource "helm_release" "cert_manager" {
  name             = "cert-manager"
  repository       = "https://charts.jetstack.io"
  chart            = "cert-manager"
  version          = var.chart_versions.cert_manager
  namespace        = "cert-manager"
  create_namespace = true
  atomic           = true

  values = [yamlencode({
    crds       = { enabled = true }
    prometheus = { servicemonitor = { enabled = true, labels = { release = "kube-prometheus-stack" } } }
  })]
}

resource "kubernetes_manifest" "cluster_issuer" {
  for_each = {
    letsencrypt-prod    = "https://acme-v02.api.letsencrypt.org/directory"
    letsencrypt-staging = "https://acme-staging-v02.api.letsencrypt.org/directory"
  }
  manifest = {
    apiVersion = "cert-manager.io/v1"
    kind       = "ClusterIssuer"
    metadata   = { name = each.key }
    spec = {
      acme = {
        server              = each.value
        email               = var.acme_email
        privateKeySecretRef = { name = "${each.key}-account-key" }
        solvers             = [{ http01 = { ingress = { ingressClassName = "nginx" } } }]
      }
    }
  }
  depends_on = [helm_release.cert_manager]
}

data "aws_iam_policy_document" "external_secrets_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = ["system:serviceaccount:external-secrets:external-secrets"]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "external_secrets" {
  name               = "${var.cluster_name}-external-secrets"
  assume_role_policy = data.aws_iam_policy_document.external_secrets_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "external_secrets" {
  role       = aws_iam_role.external_secrets.name
  policy_arn = var.secrets_read_policy_arn
}

resource "helm_release" "external_secrets" {
  name             = "external-secrets"
  repository       = "https://charts.external-secrets.io"
  chart            = "external-secrets"
  version          = var.chart_versions.external_secrets
  namespace        = "external-secrets"
  create_namespace = true
  atomic           = true

  values = [yamlencode({
    installCRDs    = true
    serviceAccount = { name = "external-secrets", annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.external_secrets.arn } }
    serviceMonitor = { enabled = true, additionalLabels = { release = "kube-prometheus-stack" } }
  })]
}

resource "kubernetes_manifest" "cluster_secret_store" {
  manifest = {
    apiVersion = "external-secrets.io/v1"
    kind       = "ClusterSecretStore"
    metadata   = { name = "aws-secrets-manager" }
    spec = {
      provider = {
        aws = {
          service = "SecretsManager"
          region  = var.aws_region
          auth    = { jwt = { serviceAccountRef = { name = "external-secrets", namespace = "external-secrets" } } }
        }
      }
    }
  }
  depends_on = [helm_release.external_secrets]
}

resource "helm_release" "sealed_secrets" {
  name       = "sealed-secrets"
  repository = "https://bitnami-labs.github.io/sealed-secrets"
  chart      = "sealed-secrets"
  version    = var.chart_versions.sealed_secrets
  namespace  = "kube-system"
  atomic     = true

  values = [yamlencode({
    fullnameOverride = "sealed-secrets-controller"
    metrics          = { serviceMonitor = { enabled = true, labels = { release = "kube-prometheus-stack" } } }
  })]
}

resource "helm_release" "kube_prometheus_stack" {
  name             = "kube-prometheus-stack"
  repository       = "https://prometheus-community.github.io/helm-charts"
  chart            = "kube-prometheus-stack"
  version          = var.chart_versions.kube_prometheus_stack
  namespace        = "monitoring"
  create_namespace = true
  atomic           = true
  timeout          = 900

  values = [yamlencode({
    prometheus = {
      prometheusSpec = {
        retention = var.prometheus_retention
        # ServiceMonitors and PrometheusRules labelled release=kube-prometheus-stack, in any namespace.
        serviceMonitorSelector          = { matchLabels = { release = "kube-prometheus-stack" } }
        ruleSelector                    = { matchLabels = { release = "kube-prometheus-stack" } }
        serviceMonitorNamespaceSelector = {}
        ruleNamespaceSelector           = {}
      }
    }
  })]
}

resource "helm_release" "prometheus_adapter" {
  name       = "prometheus-adapter"
  repository = "https://prometheus-community.github.io/helm-charts"
  chart      = "prometheus-adapter"
  version    = var.chart_versions.prometheus_adapter
  namespace  = "monitoring"
  atomic     = true

  values = [yamlencode({
    prometheus = { url = "http://kube-prometheus-stack-prometheus.monitoring.svc", port = 9090 }
    rules = {
      default = false
      custom = [{
        seriesQuery  = "${var.schedule_to_start_series}{namespace!=\"\",pod!=\"\"}"
        resources    = { overrides = { namespace = { resource = "namespace" }, pod = { resource = "pod" } } }
        name         = { as = var.schedule_to_start_metric }
        metricsQuery = "histogram_quantile(0.95, sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (le, <<.GroupBy>>))"
      }]
    }
  })]
  depends_on = [helm_release.kube_prometheus_stack]
}
