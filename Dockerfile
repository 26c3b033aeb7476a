# syntax=docker/dockerfile:1
# The API and worker images, one file with two targets sharing every layer but the browser:
#   docker buildx build --target api    -t roomly-billing-api:TAG .
#   docker buildx build --target worker -t roomly-billing-worker:TAG .
# The base image is pinned by version. Its digest is not written here (none could be looked up
# where this file was written); pin it for releases with the digest printed by
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm
# e.g. --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> (build-image.yml does).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: the virtualenv from the runtime lock (exact pins, a subset of requirements.lock) ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY requirements-runtime.lock ./
RUN uv venv /opt/venv \
    && uv pip install --python /opt/venv/bin/python --no-cache -r requirements-runtime.lock
COPY worker.py ./
COPY activities ./activities
COPY adapters ./adapters
COPY api ./api
COPY billing ./billing
COPY core ./core
COPY devstack ./devstack
COPY schema ./schema
COPY services ./services
COPY web ./web
COPY workflows ./workflows
# Bytecode now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app

# --- runtime: what both images share; a numeric non-root user, no compilers, no caches ---------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ENVIRONMENT=production \
    LOG_FORMAT=json \
    DATA_DIR=/var/lib/roomly \
    HOME=/tmp
RUN groupadd --system --gid 10001 roomly \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin roomly \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/roomly
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app

# --- api: uvicorn, one process per pod (the HorizontalPodAutoscaler adds pods) ------------------
FROM runtime AS api
USER 10001:10001
EXPOSE 8000
# Kubernetes ignores this and uses the chart's probes; it serves `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--proxy-headers", "--forwarded-allow-ips", "*", "--timeout-graceful-shutdown", "20"]

# --- worker: Debian's chromium-headless-shell renders the invoice PDFs ---------------------------
FROM runtime AS worker
USER 0
RUN apt-get update \
    && apt-get install -y --no-install-recommends chromium-headless-shell fonts-dejavu-core fonts-liberation \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
ENV CHROMIUM_PATH=/usr/lib/chromium/chromium-headless-shell
USER 10001:10001
# The worker serves no HTTP of its own yet: the chart's probes watch it (docs/deployment.md).
HEALTHCHECK NONE
CMD ["python", "worker.py"]
