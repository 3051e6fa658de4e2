#!/bin/sh
# The UI container's command (infra/docker/frontend.Dockerfile):
#   tandem-frontend serve        nginx in the foreground, its configuration made from PORT (default
#                                5173) and TANDEM_GATEWAY_URL (default http://gateway:8000)
#   tandem-frontend healthcheck  exit 0 when the UI answers 200 on / (the image has no curl)
set -eu
port="${PORT:-5173}"
case "${1:-serve}" in
serve)
    gateway="${TANDEM_GATEWAY_URL:-http://gateway:8000}"
    mkdir -p /tmp/nginx
    sed -e "s|@PORT@|${port}|g" -e "s|@GATEWAY@|${gateway%/}|g" /etc/tandem/nginx.conf.in >/tmp/nginx/nginx.conf
    exec nginx -c /tmp/nginx/nginx.conf -e stderr -g "daemon off;"
    ;;
healthcheck)
    exec bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n" >&3 \
        && head -n 1 <&3 | grep -q " 200 "' healthcheck "$port"
    ;;
*)
    echo "usage: tandem-frontend serve|healthcheck" >&2
    exit 2
    ;;
esac
