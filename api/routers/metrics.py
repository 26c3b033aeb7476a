"""``GET /metrics``: the process's Prometheus metrics (core/metrics.py), outside ``/v1`` and without
authentication: it must be reachable from the cluster's Prometheus only (the chart's NetworkPolicy
admits the monitoring namespace to this port; an ingress must not route ``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """The text exposition format; a plain function, so FastAPI runs it in its thread pool."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
