#!/usr/bin/env bash
# Builds the kubelet, kube-scheduler and kube-controller-manager at the release pinned in
# tests/kube-bin/node/go.mod (the same k8s.io/kubernetes as ../apiserver) into
# $STORERELAY_CACHE_DIR/kube-bin/node-<hash of the pins>/ (default ~/.cache/storerelay, else the repo's
# ignored .cache/) and prints that folder. Reused while the pins are unchanged, across clones. The real-node
# tier (tests/node) needs them; the API-server tier does not, so this is a script of its own.
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "kube-bin: Go is required to build the kubelet" >&2; exit 1; }
pins=$(cat build-node.sh node/go.mod node/go.sum | sha256sum | cut -c1-16)
cache="${STORERELAY_CACHE_DIR:-${HOME:-/nonexistent}/.cache/storerelay}"
mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] || cache="$(cd ../.. && pwd)/.cache"
out="$cache/kube-bin/node-$pins"
commands="kubelet kube-scheduler kube-controller-manager"
missing=""
for c in $commands; do [ -x "$out/$c" ] || missing="$missing $c"; done
if [ -z "$missing" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
export GOFLAGS="-mod=readonly -trimpath"
export CGO_ENABLED=0
started=$(date +%s)
version=$(sed -n 's#^require k8s.io/kubernetes \(v[0-9.]*\)$#\1#p' node/go.mod)
minor=$(echo "$version" | cut -d. -f2)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1"
ldflags="$ldflags -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
for c in $missing; do
  (cd node && go build -ldflags="$ldflags" -o "$out/$c.tmp" "k8s.io/kubernetes/cmd/$c") >&2
  mv "$out/$c.tmp" "$out/$c"
done
echo "kube-bin: built$missing in $(( $(date +%s) - started ))s" >&2
echo "$out"
