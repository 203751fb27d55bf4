# syntax=docker/dockerfile:1
# The factory-ingest image: `ingest run` by default; `ingest simulate ...` and the other
# subcommands with another command (docker-compose.yml runs both).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the package and its dependencies into a virtualenv -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what the package needs (see .dockerignore as well): no tests, no local secrets.
COPY pyproject.toml README.md ./
COPY ingest ./ingest
COPY devices ./devices
RUN pip install --no-cache-dir .

# --- runtime -------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG INGEST_UID=10001
RUN groupadd --system --gid "${INGEST_UID}" ingest \
    && useradd --system --uid "${INGEST_UID}" --gid ingest \
        --home-dir /var/lib/ingest --shell /usr/sbin/nologin ingest \
    && mkdir -p /var/lib/ingest /var/cache/ingest/numba \
    && chown -R ingest:ingest /var/lib/ingest /var/cache/ingest
# The virtualenv stays owned by root: the service cannot change its own code.
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/ingest/numba
# /healthz and /metrics stay on the container's loopback: the HEALTHCHECK below runs
# inside the container, and nothing else in the compose stack needs them. /metrics has
# no authentication, so opening it is an explicit choice: when a Prometheus is added,
# set INGEST_SERVICE_HEALTH_LISTEN=0.0.0.0:9108 on the ingest service and scrape it over
# the compose network, without publishing the port on the host.
ENV INGEST_SERVICE_HEALTH_LISTEN=127.0.0.1:9108

USER ingest
# Relative paths (simulator labels, a dead-letter file) land in the user's own directory.
WORKDIR /var/lib/ingest

# Compile the Numba kernels now, as the user that runs them, into NUMBA_CACHE_DIR, so
# the service starts without a JIT pause. Numba keys its cache on the CPU: on a host
# whose CPU differs from the build machine's, the first start compiles again into the
# same (writable) directory.
RUN python -c "from ingest.processing.detectors import DetectorBank; DetectorBank().warm_up_jit()"

# Healthy while GET /healthz answers 200 (MQTT connected, writes succeeding). The probe
# follows INGEST_SERVICE_HEALTH_LISTEN and asks 127.0.0.1 when it listens on all
# addresses. python:slim has no curl, hence urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; h, _, p = os.environ.get('INGEST_SERVICE_HEALTH_LISTEN', '127.0.0.1:9108').rpartition(':'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::', '[::]') else h; urllib.request.urlopen(f'http://{h}:{p}/healthz', timeout=4)"]

ENTRYPOINT ["ingest"]
CMD ["run"]
