#!/usr/bin/env bash
# Builds the sidecar and operator images with whatever OCI builder the machine has (podman, buildah or
# docker). The static binaries are built on the host and copied into `scratch` images (the Dockerfiles'
# `prebuilt` target), so no base image has to be pulled from a registry.
#   images/build.sh [sidecar|operator ...]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
builder=""
for candidate in podman buildah docker; do
  if command -v "$candidate" >/dev/null; then builder=$candidate; break; fi
done
[ -n "$builder" ] || { echo "images: no OCI builder (podman, buildah or docker); on Debian: apt-get install podman" >&2; exit 1; }
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/images/containers.conf}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
images=("${@:-sidecar operator}")
read -r -a images <<< "${images[*]}"
mkdir -p .cache/images
for image in "${images[@]}"; do
  case "$image" in
    sidecar) packages=(-p storerelay-sidecar --bin storerelay-sidecar); binaries=(storerelay-sidecar) ;;
    operator) packages=(-p storerelay-operator --bins); binaries=(storerelay-operator storerelayctl) ;;
    *) echo "images: unknown image $image" >&2; exit 1 ;;
  esac
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target" "${packages[@]}" >&2
  for binary in "${binaries[@]}"; do
    cp "$target_dir/$target/release/$binary" .cache/images/
  done
  tag="storerelay/storerelay-$image:$version"
  if [ "$builder" = buildah ]; then
    buildah bud -q -f "images/$image.Dockerfile" --target prebuilt -t "$tag" . >&2
  else
    "$builder" build -q -f "images/$image.Dockerfile" --target prebuilt -t "$tag" . >&2
  fi
  size=$("$builder" image inspect "$tag" --format '{{.Size}}' 2>/dev/null || echo "?")
  echo "$tag $size bytes (binary: $(stat -c %s ".cache/images/${binaries[0]}") bytes)"
done
