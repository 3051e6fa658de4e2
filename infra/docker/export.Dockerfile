# The export as a one-shot job, the only image with torch: it writes a bundle to /bundles/<name>.
#   docker build -f infra/docker/export.Dockerfile -t tandem-export .
#   docker run --rm -v "$PWD/bundles:/bundles" tandem-export --model gpt2 --out /bundles/gpt2
# PIP_ARGS defaults to PyTorch's CPU index, so pip does not pull the multi-GB CUDA build of torch.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS deps
ARG PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
COPY requirements/serve.txt requirements/serve-common.txt requirements/export.txt build/wheel[s] /tmp/wheels/
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
USER 10001:10001
ENTRYPOINT ["python", "-m", "export"]
CMD ["--help"]
