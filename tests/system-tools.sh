#!/usr/bin/env bash
# The system tools some tests need beyond .venv: Debian's prometheus (promtool, the live
# observability tests), chromium (the browser test), docker.io + docker-compose + mmdebstrap (the
# container tests). `make test` runs this first: as root with apt-get it installs what is missing,
# as `make install` does for Prometheus; otherwise it says what to install, and the tests that
# need a missing tool skip with the same advice.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive

declare -A package=(
  [prometheus]=prometheus [promtool]=prometheus [chromium]=chromium
  [dockerd]=docker.io [docker]=docker.io [docker-compose]=docker-compose [mmdebstrap]=mmdebstrap
)
missing=()
for tool in "${!package[@]}"; do
  command -v "$tool" >/dev/null || missing+=("${package[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing the tests' system tools: ${missing[*]}"
  apt-get install -y --no-install-recommends "${missing[@]}" \
    || { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } \
    || echo "note: apt-get could not install ${missing[*]}; the tests that need them skip, saying so"
else
  echo "note: some tests need ${missing[*]}, which this user cannot install; they skip until" \
    "\`sudo apt-get install --no-install-recommends ${missing[*]}\` (or \`sudo make test\`)"
fi
exit 0
