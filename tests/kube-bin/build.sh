#!/usr/bin/env bash
# Builds kube-apiserver and etcd at the versions pinned in tests/kube-bin/*/go.mod into
# $STORERELAY_CACHE_DIR/kube-bin/<hash of the pins>/ (default ~/.cache/storerelay, else the repo's
# ignored .cache/) and prints that folder. Reused while the pins are unchanged, across clones.
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "kube-bin: Go is required to build kube-apiserver and etcd" >&2; exit 1; }
pins=$(cat build.sh apiserver/go.mod apiserver/go.sum etcd/go.mod etcd/go.sum | sha256sum | cut -c1-16)
cache="${STORERELAY_CACHE_DIR:-${HOME:-/nonexistent}/.cache/storerelay}"
mkdir -p "$cache" 2>/dev/null && [ -w "$cache" ] || cache="$(cd ../.. && pwd)/.cache"
out="$cache/kube-bin/$pins"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
export GOFLAGS="-mod=readonly -trimpath"
export CGO_ENABLED=0
started=$(date +%s)
(cd etcd && go build -ldflags="-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3) >&2
# The version the server reports (helm checks charts' kubeVersion against it), as release builds set it.
version=$(sed -n 's#^require k8s.io/kubernetes \(v[0-9.]*\)$#\1#p' apiserver/go.mod)
minor=$(echo "$version" | cut -d. -f2)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1"
ldflags="$ldflags -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
(cd apiserver && go build -ldflags="$ldflags" -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver) >&2
mv "$out/etcd.tmp" "$out/etcd"
mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
echo "kube-bin: built kube-apiserver and etcd in $(( $(date +%s) - started ))s" >&2
echo "$out"
