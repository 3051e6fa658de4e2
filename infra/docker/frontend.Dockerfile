# The web UI as static files behind nginx (non-root, port 5173), which also forwards the API
# routes to the gateway, so the browser talks to one origin. Built from the repository root:
#   docker build -f infra/docker/frontend.Dockerfile -t tandem-frontend .
ARG NODE_IMAGE=node:20-bookworm-slim
ARG STATIC_IMAGE=nginxinc/nginx-unprivileged:1.27-alpine

FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/ ./
RUN npm run build

FROM ${STATIC_IMAGE}
COPY infra/docker/nginx.conf /etc/nginx/conf.d/default.conf
COPY --from=build /src/dist /usr/share/nginx/html
# nginx-unprivileged runs as uid 101
USER 101
EXPOSE 5173
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:5173/"]
