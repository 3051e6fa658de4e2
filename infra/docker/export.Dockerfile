# The export, the only image with torch. Its default command is the deployment's one-shot step
# (`python -m export.job`: the compose `export` service, the Kubernetes Job; TANDEM_EXPORT_* set it),
# which writes a bundle to /bundles/<model> unless a usable one is there. Directly:
#   docker build -f infra/docker/export.Dockerfile -t tandem-export .
#   docker run --rm -v "$PWD/bundles:/bundles" tandem-export python -m export --model gpt2 --out /bundles/gpt2
# PIP_ARGS defaults to PyTorch's CPU index, so pip does not pull the multi-GB CUDA build of torch;
# an offline build puts wheels in build/wheels-export and passes PIP_ARGS=--no-index.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS deps
ARG PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# the patterns keep the wheel folders optional: copied when they exist
COPY requirements/serve.txt requirements/serve-common.txt requirements/export.txt build/wheel[s] build/wheels-expor[t] /tmp/wheels/
# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      --find-links /tmp/wheels ${PIP_ARGS} -r /tmp/wheels/export.txt \
 && /opt/venv/bin/pip uninstall --yes pip

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/tmp/huggingface
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY functions/ functions/
COPY export/ export/
# a new named volume mounted here starts out owned by the image's user, so the export can write it
RUN install -d -o 10001 -g 10001 /bundles
USER 10001:10001
CMD ["python", "-m", "export.job"]
