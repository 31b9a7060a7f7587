# syntax=docker/dockerfile:1
# The Sieve worker image: `sieve worker` (router), `sieve review` (LLM reviewer) and the
# one-shot commands (`sieve topics create`, `sieve routes sync`). Two variants, one file:
#
#   docker build -t sieve:cpu .                          # torch CPU wheels
#   docker build --build-arg VARIANT=cuda -t sieve:cuda .  # torch CUDA wheels (they bundle the
#                                                          # CUDA runtime; the host needs the NVIDIA
#                                                          # driver and container toolkit)
#
# The text model (all-MiniLM-L6-v2) ships inside a Python package, so the image needs no
# model download at run time (HF_HUB_OFFLINE=1). For another model, mount its directory and
# point the topology's `encoder.model` at it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    FAUST_DATADIR=/tmp/faust-data \
    SIEVE_ONNX_CACHE_DIR=/opt/sieve-onnx \
    SIEVE_METRICS_PORT=9108
RUN useradd --create-home --uid 10001 --user-group sieve
WORKDIR /app

# torch first, in its own layer: it is most of the image and changes least.
FROM base AS torch-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_CPU_INDEX}" torch==2.14.1 torchvision==0.29.1

FROM base AS torch-cuda
# PyPI's Linux x86_64 torch wheels are the CUDA build.
RUN pip install torch==2.14.1 torchvision==0.29.1

FROM torch-${VARIANT} AS final
ARG VARIANT
COPY pyproject.toml README.md requirements.lock ./
COPY workers ./workers
RUN pip install -c requirements.lock . && rm -rf build workers/*.egg-info
# On the CPU, backend auto runs MiniLM exported to ONNX (on OpenVINO): export it (fp32 and the
# int8 copies) into the image, so a worker starts without exporting. The CUDA image runs torch
# fp16 instead.
RUN if [ "${VARIANT}" = cpu ]; then \
        python -c "from sieve.encoders.onnx_encoder import OnnxEncoder; OnnxEncoder(cache_dir='/opt/sieve-onnx')"; \
    fi
COPY topologies ./topologies
COPY routes ./routes
COPY schemas ./schemas
USER sieve
EXPOSE 9108 8088
# /healthz: the event loop's heartbeat (see workers/sieve/health.py).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIEVE_METRICS_PORT', '9108'), timeout=4)"
ENTRYPOINT ["sieve"]
CMD ["worker", "topologies/moderation.yaml"]
