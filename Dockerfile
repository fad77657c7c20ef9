# prunelab image for the cluster (MLflow server, Ray head and GPU workers).
# Build args: TORCH_IMAGE (CUDA base with torch), FLASH_ATTN=1 to add FlashAttention-2.
ARG TORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${TORCH_IMAGE}
ARG FLASH_ATTN=0
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/prunelab
COPY pyproject.toml README.md ./
COPY prunelab ./prunelab
RUN pip install -e . && if [ "$FLASH_ATTN" = "1" ]; then pip install -e ".[gpu]" --no-build-isolation; fi
EXPOSE 5000 6379 8265 10001
