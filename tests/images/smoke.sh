#!/usr/bin/env bash
# Builds the sidecar image and runs it the way Kubernetes would (read-only root, uid 65532, a writable
# spool volume) with `make demo`'s config, then checks /healthz, /readyz and one notification.
# Skips when no podman is installed, except under CI, where .ci/run installs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v podman >/dev/null; then
  if [ -n "${CI:-}" ]; then echo "image smoke test: podman is missing" >&2; exit 1; fi
  echo "image smoke test: skipped (no podman; apt-get install podman runc)"
  exit 0
fi
export CONTAINERS_CONF="$PWD/images/containers.conf"
runtime=()
command -v runc >/dev/null && runtime=(--runtime runc)
podman=(podman --cgroup-manager=cgroupfs)
images/build.sh sidecar
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
work=$(mktemp -d)
name="storerelay-smoke-$$"
cleanup() { "${podman[@]}" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/spool" && chmod 0777 "$work/spool"
sed -e 's#path: target/demo/spool.db#path: /spool/spool.db#' examples/demo.yaml > "$work/config.yaml"
"${podman[@]}" run -d --name "$name" "${runtime[@]}" --network host --read-only --user 65532:65532 \
  -v "$work/config.yaml:/config.yaml:ro" -v "$work/spool:/spool" \
  "storerelay/storerelay-sidecar:$version" --config /config.yaml >/dev/null
for _ in $(seq 1 50); do
  curl -fsS http://127.0.0.1:19089/readyz >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS http://127.0.0.1:19089/healthz
curl -fsS http://127.0.0.1:19089/readyz
status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
  --data '{"notification_type":"TEST","environment":"Sandbox"}' http://127.0.0.1:18089/apple/notifications)
[ "$status" = 200 ] || { echo "image smoke test: POST answered $status"; "${podman[@]}" logs "$name"; exit 1; }
# Read the whole page first: `curl | grep -q` fails under pipefail when grep stops reading early.
metrics=$(curl -fsS http://127.0.0.1:19089/metrics)
grep -q '^storerelay_notifications_received_total{version="v1"' <<< "$metrics" \
  || { echo "image smoke test: the notification was not counted"; echo "$metrics"; exit 1; }
"${podman[@]}" stop -t 10 "$name" >/dev/null
echo "1 passed, 0 failed: sidecar image answers /healthz, /readyz and stores a notification"
