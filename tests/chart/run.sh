#!/usr/bin/env bash
# Chart and manifest checks with the real helm and the Kubernetes schemas (kubernetes-validate).
# Installs both into .cache (ignored) and reuses them while their pins do not change.
set -euo pipefail
cd "$(dirname "$0")/../.."
helm=$(tests/tools/install-helm.sh)
venv=.cache/chart-venv
requirements="kubernetes-validate==1.37.0 pyyaml==6.0.2 pytest==8.3.4"
if [ "$(cat "$venv/pins" 2>/dev/null)" != "$requirements" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements
  echo "$requirements" > "$venv/pins"
fi
export HELM="$PWD/$helm"
export STORERELAYCTL="${STORERELAYCTL:?set STORERELAYCTL to the storerelayctl binary}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/chart "$@"
