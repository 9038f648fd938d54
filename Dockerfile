# langconvert as a container step: `docker run --rm -v $PWD:/work langconvert recipes/korean.yaml`
# CPU by default; `--build-arg RUNTIME=gpu` installs onnxruntime-gpu and the CUDA build of torch instead.
FROM python:3.11-slim
ARG RUNTIME=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
WORKDIR /opt/langconvert
COPY pyproject.toml README.md ./
COPY converter ./converter
COPY recipes ./recipes
RUN if [ "$RUNTIME" = "gpu" ]; then \
        pip install torch==2.13.0 ".[gpu]"; \
    else \
        pip install --extra-index-url "$TORCH_INDEX" torch==2.13.0 ".[cpu]"; \
    fi
WORKDIR /work
ENTRYPOINT ["langconvert"]
CMD ["--help"]
