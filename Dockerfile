# syntax=docker/dockerfile:1
# layergrad-server image. The build stage runs scripts/install.sh, the script `make setup` and CI run,
# into a virtual environment that the runtime stage copies at the same path. Pin the base image by
# digest where images are built (docker buildx imagetools inspect python:3.11.7-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY client client
COPY server server
RUN PYTHON=python3 scripts/install.sh --venv /opt/layergrad/venv --no-editable \
    && /opt/layergrad/venv/bin/layergrad-server --help > /dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 layergrad \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin layergrad
COPY --from=build /opt/layergrad/venv /opt/layergrad/venv
ENV PATH=/opt/layergrad/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LAYERGRAD_CACHE_DIR=/weights
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
ENTRYPOINT ["layergrad-server"]
CMD ["--address", "0.0.0.0:50051", "--workers", "1"]
