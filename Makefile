# storerelay: `make demo` runs it, `make test` tests it.
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: build release test test-node lint fmt demo crds manifests images bench bench-quick bench-prepare clean

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release -p storerelay-sidecar --bin storerelay-sidecar
	$(CARGO) build --release -p storerelay-operator --bins

# The sidecar as shipped in its image: static, release. The memory test measures this binary.
STATIC_TARGET := x86_64-unknown-linux-gnu
SIDECAR_STATIC := $(abspath $(TARGET_DIR))/$(STATIC_TARGET)/release/storerelay-sidecar

test:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked --target $(STATIC_TARGET) -p storerelay-sidecar --bin storerelay-sidecar
	STORERELAY_RELEASE_SIDECAR=$(SIDECAR_STATIC) $(CARGO) test --workspace --all-targets
	$(CARGO) build -p storerelay-operator --bin storerelayctl
	STORERELAYCTL=$(abspath $(TARGET_DIR))/debug/storerelayctl tests/chart/run.sh
	tests/images/smoke.sh
	tests/node/run.sh

# The real-node tier: etcd, kube-apiserver, scheduler, controller-manager, containerd and a kubelet in the
# test's own namespaces; the chart installed with the locally built images, pods that really run
# (docs/operator.md, "Testing on a real node"). Skips itself when a prerequisite is missing, unless CI=true.
test-node:
	tests/node/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# The sidecar alone, as its image builds it (without the config crate's `schema` feature).
	$(CARGO) clippy -p storerelay-sidecar --bin storerelay-sidecar -- -D warnings

fmt:
	$(CARGO) fmt --all

demo:
	$(CARGO) build -p storerelay-sidecar --bin storerelay-sidecar --example demo
	$(TARGET_DIR)/debug/examples/demo

# Regenerate the committed CRDs from the Rust types (a test fails while they differ).
crds:
	$(CARGO) run -q -p storerelay-operator --bin storerelayctl -- crd > deploy/crds/notificationroutes.storerelay.dev.yaml
	cp deploy/crds/notificationroutes.storerelay.dev.yaml charts/storerelay/crds/

# Benchmarks (docs/benchmarks.md, target/bench/results.json): the sidecar against direct, Node and nginx.
bench: bench-prepare
	$(TARGET_DIR)/release/storerelay-bench run --sidecar $(TARGET_DIR)/release/storerelay-sidecar --operator $(TARGET_DIR)/release/storerelay-operator --out $(TARGET_DIR)/bench

bench-quick: bench-prepare
	$(TARGET_DIR)/release/storerelay-bench run --quick --sidecar $(TARGET_DIR)/release/storerelay-sidecar --operator $(TARGET_DIR)/release/storerelay-operator --out $(TARGET_DIR)/bench

bench-prepare:
	bench/setup.sh
	# The image's static binary, built from this tree so its rows describe it (left out without a builder).
	rm -f .cache/images/storerelay-sidecar
	images/build.sh sidecar || echo "bench: the sidecar image was not built; its rows are left out" >&2
	$(CARGO) build --release -p storerelay-sidecar --bin storerelay-sidecar
	$(CARGO) build --release -p storerelay-operator --bin storerelay-operator
	tests/tools/install-helm.sh >/dev/null
	$(CARGO) build --release -p storerelay-bench

# Container images for the sidecar and the operator, with podman, buildah or docker.
images:
	images/build.sh sidecar operator

# Regenerate deploy/storerelay.yaml: the chart rendered with its defaults (a test fails while it differs).
manifests:
	$$(tests/tools/install-helm.sh) template storerelay charts/storerelay -n storerelay --include-crds > deploy/storerelay.yaml

clean:
	$(CARGO) clean
