# storerelay: `make demo` runs it, `make test` tests it.
CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: build release test lint fmt demo clean

build:
	$(CARGO) build --workspace --all-targets

release:
	$(CARGO) build --release -p storerelay-sidecar --bin storerelay-sidecar

test:
	$(CARGO) test --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

demo:
	$(CARGO) build -p storerelay-sidecar --bin storerelay-sidecar --example demo
	$(TARGET_DIR)/debug/examples/demo

clean:
	$(CARGO) clean
