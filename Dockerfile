# syntax=docker/dockerfile:1
# statesweep's one image: `statesweep`, `celery -A workers worker|beat|flower`. Configuration
# comes only from the environment at run time (docker-compose.yml, .env.example); the image
# holds no settings and no secrets.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: wheels for the package and every dependency ----------------------------------
FROM ${PYTHON_IMAGE} AS builder
# A compiler only for a dependency that ships no wheel for this platform; it stays here.
# Unpinned: whatever the base image's Debian release ships; none of it reaches the runtime.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md beat_schedule.py ./
COPY workers ./workers
RUN pip wheel --wheel-dir /wheels '.[flower,mysql]'

# --- runtime: the installed package, a non-root user, no build tools -----------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    STATESWEEP_LOG_FORMAT=json
RUN groupadd --system --gid 10001 statesweep \
    && useradd --system --uid 10001 --gid statesweep --home-dir /var/lib/statesweep \
       --shell /usr/sbin/nologin statesweep \
    && install -d -o statesweep -g statesweep /var/lib/statesweep
# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# Pinned by construction: --no-index installs exactly the wheels the builder made.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'statesweep[flower,mysql]'
WORKDIR /var/lib/statesweep
# Numeric, so a runtime that requires non-root (runAsNonRoot) can check it.
USER 10001:10001
EXPOSE 5555
CMD ["statesweep", "--help"]
