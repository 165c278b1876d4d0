# storerelay-sidecar: one static binary on scratch, uid 65532. CA roots for HTTPS destinations are
# compiled in (webpki roots), so the image needs no files besides the binary.
#
#   docker build -f images/sidecar.Dockerfile -t storerelay/storerelay-sidecar:0.1.0 .
#
# `make images` builds the binary on the host first and uses the `prebuilt` target, which needs no
# base image from a registry.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p storerelay-sidecar --bin storerelay-sidecar --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/storerelay-sidecar /storerelay-sidecar

FROM scratch AS prebuilt
COPY .cache/images/storerelay-sidecar /storerelay-sidecar
USER 65532:65532
EXPOSE 8089 9089
ENTRYPOINT ["/storerelay-sidecar"]

FROM scratch
COPY --from=build /storerelay-sidecar /storerelay-sidecar
USER 65532:65532
EXPOSE 8089 9089
ENTRYPOINT ["/storerelay-sidecar"]
