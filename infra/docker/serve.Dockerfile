# The serving images, built from the repository root; no torch in either (requirements/serve.txt):
#   docker build -f infra/docker/serve.Dockerfile --target function -t tandem-function .
#   docker build -f infra/docker/serve.Dockerfile --target gateway  -t tandem-gateway .
# `function` runs the tokenizer or a stage, chosen by the command (see docker-compose.yml).
# The CUDA variant of `function` swaps ONNX Runtime for onnxruntime-gpu with NVIDIA's CUDA and cuDNN
# pip packages (no CUDA base image needed; the host's driver comes in through the NVIDIA runtime):
#   docker build -f infra/docker/serve.Dockerfile --target function -t tandem-function-cuda \
#     --build-arg ONNXRUNTIME='onnxruntime-gpu[cuda,cudnn]==1.31.1' .
# and run it with TANDEM_PROVIDER=cuda.
# BASE_IMAGE: any image with python3 (>= 3.11) and its venv module. PIP_ARGS: extra pip arguments;
# an offline build puts wheels in build/wheels and passes PIP_ARGS=--no-index.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS deps
ARG PIP_ARGS=""
# empty: the onnxruntime pinned in requirements/serve.txt; else the requirement that replaces it
ARG ONNXRUNTIME=""
# the pattern keeps build/wheels optional: it is copied when it exists
COPY requirements/serve.txt requirements/serve-common.txt build/wheel[s] /tmp/wheels/
# PIP_ARGS is a list of arguments: word splitting is wanted
# hadolint ignore=SC2086
RUN if [ -n "$ONNXRUNTIME" ]; then sed -i "s|^onnxruntime==.*|$ONNXRUNTIME|" /tmp/wheels/serve.txt; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      --find-links /tmp/wheels ${PIP_ARGS} -r /tmp/wheels/serve.txt \
 && /opt/venv/bin/pip uninstall --yes pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TANDEM_HOST=0.0.0.0
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY functions/ functions/

# Stage and tokenizer functions: `python -m functions.stage --bundle /bundle --stage K` or the
# default command below. The bundle is mounted, baked (infra/docker/bundle.Dockerfile) or fetched
# at start (TANDEM_BUNDLE_URL); every file is checked against the manifest's sha256 before ready.
FROM runtime AS function
ENV PORT=8080 \
    TANDEM_VERIFY_HASHES=1
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "functions.healthcheck", "/v2/health/ready"]
CMD ["python", "-m", "functions.tokenizer", "--bundle", "/bundle"]

# The gateway; its config.json (the original shape, see gateway/config.py) is mounted here.
FROM runtime AS gateway
COPY gateway/ gateway/
ENV PORT=8000
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "functions.healthcheck", "/readyz"]
CMD ["python", "-m", "gateway", "--config", "/etc/tandem/config.json"]
