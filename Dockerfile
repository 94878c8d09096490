# AIOS Kernel image: the package, its compiled extensions and the demo models.
#   docker build -t aios-kernel .
#   docker run -p 8001:8001 aios-kernel                       # serves the claims demo
#   docker run -p 8001:8001 -v $PWD/models:/models aios-kernel serve --models /models --host 0.0.0.0
# GPU: build with --build-arg RUNTIME_EXTRA=gpu on a CUDA base image and run with --gpus all.
FROM python:3.11-slim AS build
ARG RUNTIME_EXTRA=cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ext
COPY kernel kernel
COPY examples examples
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${RUNTIME_EXTRA}]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY examples examples
# The demo models are built at image build time, deterministically, in seconds.
RUN python examples/claims/build_models.py --out /app/models
RUN useradd --system --uid 10001 aios && mkdir -p /app/var && chown aios /app/var
USER aios
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:8001'); sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status != 1)"
ENTRYPOINT ["aios-kernel"]
CMD ["serve", "--models", "/app/models", "--host", "0.0.0.0"]
