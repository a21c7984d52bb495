# syntax=docker/dockerfile:1
#
# The gateway as a container image (issue 5, "Container"):
#   docker build -t gateway:0.1.0 .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/deploy/gateway.yaml:/etc/gateway/gateway.yaml:ro" \
#     -v gateway-keys:/var/lib/gateway/keys \
#     -e GATEWAY_PUBLIC_URL=http://localhost:8080 \
#     -e GATEWAY_DATABASE_URL=postgresql://gateway:secret@db:5432/gateway \
#     -e GATEWAY_UPSTREAM=http://backend:9000 \
#     gateway:0.1.0
#
# Configuration: a mounted file at /etc/gateway/gateway.yaml whose ${VAR}s come from the
# environment (deploy/gateway.yaml is the image's default and the shape to copy).
# Signing keys: the directory /var/lib/gateway/keys, mounted from a volume or a secret. The
# gateway generates a key there on first start only if it is empty and writable; replicas must
# share one key ring, so create it once with `gateway keys rotate` and mount it read-only
# (deploy/README.md, "Signing keys").
#
# tests/test_deploy.py checks this file statically, runs the builder's RUN commands (paths
# moved into a temp dir) and then this ENTRYPOINT/CMD and HEALTHCHECK in the venv they make.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

# uv resolves and installs in seconds where pip takes half a minute; it is only in the builder.
FROM ${UV_IMAGE} AS uv

# -- builder: a wheel of the project and a venv holding it with its dependencies ---------------
FROM ${PYTHON_IMAGE} AS builder

COPY --from=uv /uv /usr/local/bin/uv
# Byte-compile at install time (the final image has a read-only root and
# PYTHONDONTWRITEBYTECODE); real copies, no cache; the base image's Python, never a download.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never

WORKDIR /src

# Dependencies first, straight from pyproject.toml: this layer is rebuilt only when they
# change, not on every code change. The venv has no pip: nothing installs at runtime.
COPY pyproject.toml README.md ./
RUN uv venv --python /usr/local/bin/python3 /opt/gateway \
 && uv pip install --python /opt/gateway/bin/python --requirement pyproject.toml

COPY gateway ./gateway
RUN uv build --wheel --out-dir /wheels .
RUN uv pip install --python /opt/gateway/bin/python --no-deps /wheels/gateway-*.whl \
 && uv pip check --python /opt/gateway/bin/python

# -- final: the venv on a clean slim base, no compiler, no pip, non-root -----------------------
FROM ${PYTHON_IMAGE} AS final

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Authentication gateway: accounts, tokens, route policy and identity-header forwarding" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml

# A fixed uid/gid so volume ownership and Kubernetes' runAsUser/fsGroup can name it. The keys
# directory exists owned by it (mode 0700): a named volume mounted there starts with that owner.
# pip, setuptools and wheel leave the base: the venv needs none of them, so there is less to patch.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway \
        --shell /usr/sbin/nologin gateway \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/gateway \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/gateway/keys \
 && install -d -o root -g root -m 0755 /etc/gateway \
 && python -m pip uninstall --yes --quiet pip setuptools wheel

COPY --from=builder /opt/gateway /opt/gateway
# The default configuration; mount your own over it (it is read-only for the gateway user).
COPY --chmod=0644 deploy/gateway.yaml /etc/gateway/gateway.yaml

USER 10001:10001
WORKDIR /var/lib/gateway

# 8080: the public listener; 9091: the admin listener (/metrics, /healthz).
EXPOSE 8080 9091

# slim has no curl: the interpreter that runs the gateway asks /healthz itself. Any error,
# refused connection or non-2xx status makes urlopen raise, so the command exits 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2)"]

# The gateway drains in-flight requests on SIGTERM within server.shutdown_grace, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/gateway.yaml"]
