# flowdiff in a container; the entry point is `flowdiff`.
#
#   docker build -t flowdiff .                                   # CPU (PyTorch's CPU wheels)
#   docker build -t flowdiff:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://pypi.org/simple .   # CUDA (PyPI's CUDA wheels)
#   docker run --rm -v "$PWD/runs:/home/flowdiff/app/runs" flowdiff fit --config configs/toy.yaml
#
# The install is README.md's `make install`, the same Makefile target CI runs before the tests:
# this file adds only the system packages it needs, a non-root user and the entry point.
ARG BASE=python:3.12-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# make always; python3 and venv only where the base has no Python (the CUDA base).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && if ! command -v python3 >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*

# A user whose uid is free in both bases (ubuntu:24.04 images already have uid 1000).
RUN useradd --create-home --uid 10001 flowdiff
USER flowdiff
WORKDIR /home/flowdiff/app

COPY --chown=flowdiff:flowdiff pyproject.toml Makefile README.md ./
COPY --chown=flowdiff:flowdiff flowdiff ./flowdiff
RUN ln -s flowdiff/configs configs && make install TORCH_INDEX=${TORCH_INDEX}

ENV PATH=/home/flowdiff/app/.venv/bin:${PATH}
ENTRYPOINT ["flowdiff"]
CMD ["--help"]
