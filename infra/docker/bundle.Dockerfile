# A function image with the model bundle baked in: no volume and no download at start (the
# fastest cold start), at the price of one image per model and a bigger pull. The build context
# is the bundle directory itself:
#   docker build -f infra/docker/bundle.Dockerfile -t tandem-function-gpt2 bundles/gpt2
# The function still checks every file against the manifest's sha256 before it reports ready
# (TANDEM_VERIFY_HASHES=1 in the function image).
ARG FUNCTION_IMAGE=tandem-function:latest
FROM ${FUNCTION_IMAGE}
COPY manifest.json *.onnx *.onnx.data tokenizer.json /bundle/
