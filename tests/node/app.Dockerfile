# The app container of the real-node tier (crates/test-app; tests/node/run.sh builds the static binary).
FROM scratch
COPY .cache/images/storerelay-test-app /storerelay-test-app
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/storerelay-test-app"]
