# AIOS Kernel image: the package, its compiled extensions and the demo models.
#   docker build -t aios-kernel .
#   docker run -p 127.0.0.1:8001:8001 aios-kernel             # serves the claims demo to this machine
#   docker run -p 127.0.0.1:8001:8001 -v $PWD/models:/models aios-kernel serve --models /models --host 0.0.0.0
#   docker run -p 127.0.0.1:9000:9000 -e AIOS_PORT=9000 aios-kernel  # another port: settings come from AIOS_* too
# The kernel has no TLS or authentication yet: publish it further only behind an authenticating proxy
# (README "Security").
# GPU: build with --build-arg RUNTIME_EXTRA=gpu --build-arg BASE=<a CUDA 12 image with Python 3.11>
# and run with --gpus all.
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
ARG RUNTIME_EXTRA=cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY ext ext
COPY kernel kernel
COPY examples examples
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${RUNTIME_EXTRA}]"

FROM ${BASE}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
RUN useradd --system --uid 10001 aios
# The served pipelines folder belongs to the kernel's user: uploads are written there (README "Pipelines").
COPY --chown=aios examples examples
# The demo models are built at image build time, deterministically.
RUN python examples/claims/build_models.py --out /app/models
# The data dir is the kernel user's alone (escalated cases' free text, the signing key): 0700, as the kernel makes one.
RUN mkdir -p /app/var && chown aios /app/var && chmod 700 /app/var
USER aios
EXPOSE 8001
# Asks the port the kernel listens on, as grpc-health-probe would: AIOS_PORT when set. Choose the port with
# AIOS_PORT (docker run -e AIOS_PORT=9000), not --port or kernel.toml, or this check asks the wrong one.
# --start-period: loading large models (or onto a GPU) may take longer than a few checks' worth.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import grpc,os,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:' + os.environ.get('AIOS_PORT', '8001')); sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status != 1)"
ENTRYPOINT ["aios-kernel"]
CMD ["serve", "--models", "/app/models", "--pipelines", "/app/examples/claims/pipelines", "--host", "0.0.0.0"]
