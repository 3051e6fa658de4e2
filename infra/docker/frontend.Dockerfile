# The web UI: the Vite build served by Debian's nginx (non-root, on $PORT, default 5173), which also
# forwards the gateway's routes to $TANDEM_GATEWAY_URL (default http://gateway:8000): the browser
# talks to one origin, so the gateway needs no CORS setting. From the repository root:
#   docker build -f infra/docker/frontend.Dockerfile -t tandem-frontend .
# NODE_IMAGE: any image with Node 20 and npm (the build stage only); BASE_IMAGE: Debian bookworm.
ARG NODE_IMAGE=node:20-bookworm-slim
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/ ./
RUN npm run build

FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*
COPY infra/docker/nginx.conf /etc/tandem/nginx.conf.in
COPY infra/docker/frontend.sh /usr/local/bin/tandem-frontend
COPY --from=build /src/dist /usr/share/tandem/ui
# the page calls the gateway on its own origin ("/"; frontend/src/settings.ts reads this tag)
RUN sed -i 's|<meta name="tandem-gateway-url" content="" />|<meta name="tandem-gateway-url" content="/" />|' \
      /usr/share/tandem/ui/index.html \
 && grep -q '<meta name="tandem-gateway-url" content="/" />' /usr/share/tandem/ui/index.html
ENV PORT=5173
USER 10001:10001
EXPOSE 5173
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["tandem-frontend", "healthcheck"]
CMD ["tandem-frontend", "serve"]
