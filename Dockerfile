# syntax=docker/dockerfile:1
# postlane's container image: `postlane serve` by default, `postlane worker ...` by command.
#
#   docker build -t postlane .
#   docker run --rm -p 8025:8025 -p 2587:2587 -v postlane-data:/var/lib/postlane postlane
#
# Two stages: the first builds wheels for postlane and everything it needs (PostgreSQL driver
# included) and installs them into a virtual environment; the second is the same slim Python
# with that environment (no pip in it) copied in, no compiler, running as an unprivileged user.
# See docs/deploy.md.

# The base both stages share (the venv is copied between them, so it must be the same Python
# at the same path), named in full so that Podman needs no short-name resolution. Override it
# to pin a digest or use a mirror:
#   --build-arg PYTHON_IMAGE=registry.example.com/python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the tree out).
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# Every dependency has a binary wheel for linux/amd64 and linux/arm64, so no compiler is needed
# here either; a platform without one needs `apt-get install build-essential` in this stage only.
# constraints.txt pins every version to what CI tested.
RUN python -m pip wheel --constraint constraints.txt --wheel-dir /wheels '.[postgres]' \
 && python -m venv /opt/postlane \
 && /opt/postlane/bin/pip install --no-index --find-links /wheels 'postlane[postgres]' \
 && /opt/postlane/bin/pip uninstall --yes pip setuptools \
 && /opt/postlane/bin/postlane --version

FROM ${PYTHON_IMAGE} AS runtime
ARG POSTLANE_UID=10025
LABEL org.opencontainers.image.title="postlane" \
      org.opencontainers.image.description="A durable outbound email queue" \
      org.opencontainers.image.source="https://github.com/postlane/postlane" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be
# chowned to it ahead of time.
RUN groupadd --system --gid "${POSTLANE_UID}" postlane \
 && useradd --system --uid "${POSTLANE_UID}" --gid postlane --no-create-home \
        --home-dir /var/lib/postlane --shell /usr/sbin/nologin postlane \
 && install -d -o postlane -g postlane -m 0750 /var/lib/postlane \
 && install -d -m 0755 /etc/postlane
COPY --from=build /opt/postlane /opt/postlane
# The image's own configuration: listen on every interface (the container's network is the
# boundary), keep the queue on the data volume. Mount your own file over it, or point
# POSTLANE_CONFIG elsewhere; POSTLANE_<SECTION>_<KEY> variables override single keys.
COPY deploy/container/postlane.toml /etc/postlane/postlane.toml
ENV PATH=/opt/postlane/bin:$PATH \
    POSTLANE_CONFIG=/etc/postlane/postlane.toml \
    HOME=/var/lib/postlane \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/postlane
# SQLite's file and the capture folder; unused (but harmless) with PostgreSQL and a relay.
VOLUME ["/var/lib/postlane"]
# 8025: HTTP API, dashboard, /metrics, /healthz, /readyz. 2587: SMTP submission.
# (A worker's probes listen where `--metrics HOST:PORT` says; 9025 by convention.)
EXPOSE 8025 2587
USER ${POSTLANE_UID}:${POSTLANE_UID}
# /readyz: the store answers and the worker runs. A worker checks its own --metrics port:
# set POSTLANE_HEALTHCHECK_URL=http://127.0.0.1:9025/readyz (deploy/compose.yaml does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('POSTLANE_HEALTHCHECK_URL', 'http://127.0.0.1:8025/readyz'), timeout=4)"]
# postlane runs as PID 1 and installs its own SIGTERM/SIGINT handlers (a graceful stop: it stops
# claiming, lets in-flight sends finish for [delivery] shutdown_grace, hands back the rest). It
# starts no child processes, so nothing needs reaping; `docker run --init` is safe too.
STOPSIGNAL SIGTERM
ENTRYPOINT ["postlane"]
CMD ["serve"]
