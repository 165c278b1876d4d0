#!/usr/bin/env bash
# The real-node tier (`make test-node`): pods that actually run, with the injected sidecar, from
# `helm install` to a rollout. See docs/operator.md, "Testing on a real node".
#
# Builds everything first (kube-apiserver, etcd, the kubelet, scheduler and controller-manager by pinned
# hash; the sidecar, operator, test-app and pause images), then runs crates/node-test as the first process
# of its own network, mount and PID namespaces: the whole cluster lives in there, nothing in it can reach
# outside, and when it ends the kernel ends every process it started. Afterwards this script removes the
# kubelet's cgroups, restores the host sysctls the kubelet rewrites, and deletes the run's files.
#
# Needs root, Go, containerd, runc, the CNI plugins, podman, gcc, PostgreSQL and util-linux's unshare.
# Outside CI a missing prerequisite skips the tier (with the reason); under CI=true it fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

skip() {
  if [ -n "${CI:-}" ]; then echo "node tier: $1" >&2; exit 1; fi
  echo "node tier: skipped ($1)"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root for its namespaces, containerd and the kubelet"
for tool in go containerd containerd-shim-runc-v2 ctr runc podman gcc unshare ip mount; do
  command -v "$tool" >/dev/null || skip "$tool is missing (Debian: containerd runc podman gcc iproute2 util-linux)"
done
cni=""
for dir in /usr/lib/cni /opt/cni/bin; do [ -x "$dir/bridge" ] && cni=$dir; done
[ -n "$cni" ] || skip "the CNI plugins are missing (Debian: containernetworking-plugins)"
postgres_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$postgres_bin" ] || skip "PostgreSQL is missing (Debian: postgresql)"

# One run at a time: the cgroup root and the sysctls are the host's.
exec 9>/tmp/storerelay-node-test.lock
flock -n 9 || { echo "node tier: another run holds /tmp/storerelay-node-test.lock" >&2; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
export CONTAINERS_CONF="$root/images/containers.conf"
target=x86_64-unknown-linux-gnu
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
cgroup_root=/storerelay-node

echo "== node tier: building"
started=$(date +%s)
kube_bin=$(tests/kube-bin/build.sh)
node_bin=$(tests/kube-bin/build-node.sh)
helm=$(tests/tools/install-helm.sh)
images/build.sh sidecar operator
RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked --target "$target" -p storerelay-test-app
mkdir -p .cache/images .cache/node
cp "$CARGO_TARGET_DIR/$target/release/storerelay-test-app" .cache/images/
gcc -static -O2 -o .cache/images/pause tests/node/pause.c
podman build -q -f tests/node/app.Dockerfile -t storerelay-test/app:1 . >/dev/null
podman build -q -f tests/node/pause.Dockerfile -t storerelay-test/pause:1 . >/dev/null
archives=()
for image in "storerelay/storerelay-sidecar:$version" "storerelay/storerelay-operator:$version" \
    storerelay-test/app:1 storerelay-test/pause:1; do
  archive=".cache/node/$(echo "$image" | tr '/:' '__').tar"
  rm -f "$archive"
  podman save -q --format oci-archive -o "$archive" "localhost/$image"
  archives+=(--image-archive "$root/$archive")
done
cargo build -q --locked -p storerelay-node-test
echo "== node tier: built in $(( $(date +%s) - started ))s"

# The kubelet sets these host-wide sysctls; put them back however the run ends.
sysctls=(vm/overcommit_memory kernel/panic kernel/panic_on_oops)
saved=()
for key in "${sysctls[@]}"; do saved+=("$(cat "/proc/sys/$key")"); done
work=$(mktemp -d /tmp/storerelay-node.XXXXXX)
chmod 0755 "$work" # PostgreSQL runs as its own user under it
remove_cgroups() {
  for hierarchy in /sys/fs/cgroup/*/; do
    [ -d "$hierarchy${cgroup_root#/}" ] || continue
    find "$hierarchy${cgroup_root#/}" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}
cleanup() {
  for i in "${!sysctls[@]}"; do echo "${saved[$i]}" > "/proc/sys/${sysctls[$i]}" || true; done
  for _ in 1 2 3 4 5; do
    remove_cgroups
    ls -d /sys/fs/cgroup/*/"${cgroup_root#/}" >/dev/null 2>&1 || break
    sleep 1
  done
  if ls -d /sys/fs/cgroup/*/"${cgroup_root#/}" >/dev/null 2>&1; then
    echo "node tier: could not remove every cgroup under $cgroup_root" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT
remove_cgroups # a run that was killed before its cleanup

echo "== node tier: running in its own namespaces"
status=0
unshare --net --mount --pid --fork --mount-proc --propagation private \
  env TMPDIR="$work" PATH="$PATH" "$CARGO_TARGET_DIR/debug/storerelay-node-test" \
    --work "$work" --kube-bin "$kube_bin" --node-bin "$node_bin" --postgres-bin "$postgres_bin" \
    --helm "$helm" --chart "$root/charts/storerelay" --cgroup-root "$cgroup_root" \
    --pause-image localhost/storerelay-test/pause:1 --app-image localhost/storerelay-test/app:1 \
    --sidecar-image "localhost/storerelay/storerelay-sidecar:$version" \
    --operator-image "localhost/storerelay/storerelay-operator:$version" \
    "${archives[@]}" "$@" || status=$?
exit "$status"
