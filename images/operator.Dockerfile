# storerelay-operator and storerelayctl (for `helm test`): static binaries on scratch, uid 65532.
#
#   docker build -f images/operator.Dockerfile -t storerelay/storerelay-operator:0.1.0 .
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p storerelay-operator --bins --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/storerelay-operator target/x86_64-unknown-linux-gnu/release/storerelayctl /

FROM scratch AS prebuilt
COPY .cache/images/storerelay-operator /storerelay-operator
COPY .cache/images/storerelayctl /storerelayctl
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/storerelay-operator"]

FROM scratch
COPY --from=build /storerelay-operator /storerelay-operator
COPY --from=build /storerelayctl /storerelayctl
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/storerelay-operator"]
