#!/usr/bin/env bash
# Installs what `make bench` compares against: wrk and nginx from Debian (when root and missing), and
# Express + axios for bench/forwarder.js into .cache/bench (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bench: please install ${missing[*]} (the harness skips what is missing)" >&2
  fi
fi
command -v wrk >/dev/null || { echo "bench: wrk is required" >&2; exit 1; }
mkdir -p .cache/bench
if ! cmp -s bench/package.json .cache/bench/package.json || [ ! -d .cache/bench/node_modules ]; then
  cp bench/package.json .cache/bench/package.json
  if command -v npm >/dev/null; then
    (cd .cache/bench && npm install --silent --no-audit --no-fund) || echo "bench: npm install failed; the Node peer is skipped" >&2
  fi
fi
