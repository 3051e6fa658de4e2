# The export, the only image with torch. Its default command is the deployment's one-shot step
# (`python -m export.job`: the compose `export` service, the Kubernetes Job; TANDEM_EXPORT_* set it),
# which writes a bundle to /bundles/<model> unless a usable one is there. Directly:
#   docker build -f infra/docker/export.Dockerfile -t tandem-export .
#   docker run --rm -v "$PWD/bundles:/bundles" tandem-export python -m export --model gpt2 --out /bundles/gpt2
# PIP_ARGS defaults to PyTorch's CPU index, so pip does not pull the multi-GB CUDA build of torch.
# Offline, serve a wheel folder over HTTP and build with the host's network:
#   python3 -m http.server -d build/wheels-export 8765 &
#   docker build --network=host --build-arg PIP_ARGS='--no-index --find-links http://127.0.0.1:8765/' ...
# One stage, wheels never in a layer: torch is installed once, not installed and then copied.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
ARG PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface
COPY requirements/serve.txt requirements/serve-common.txt requirements/export.txt /tmp/requirements/
# no byte-compiling at install (minutes for torch on a small machine): a one-shot job compiles what
# it imports; /bundles: a new named volume mounted there starts out owned by the image's user
# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile --disable-pip-version-check \
      ${PIP_ARGS} -r /tmp/requirements/export.txt \
 && /opt/venv/bin/pip uninstall --yes pip \
 && rm -rf /tmp/requirements \
 && install -d -o 10001 -g 10001 /bundles
WORKDIR /app
COPY functions/ functions/
COPY export/ export/
USER 10001:10001
CMD ["python", "-m", "export.job"]
