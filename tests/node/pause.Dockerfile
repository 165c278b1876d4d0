# The pod sandbox image of the real-node tier (tests/node/run.sh builds the binary first).
FROM scratch
COPY .cache/images/pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
