# Multi-stage image of tallyd (the node) and tally (the CLI).
#
#   docker build -t tally:latest .
#   docker run --rm -p 7001:7001 -p 8001:8001 tally:latest \
#     tallyd --listen 0.0.0.0:7001 --peer-listen 0.0.0.0:7101 --http-listen 0.0.0.0:8001
#
# Used by deploy/k8s/ (image tally:latest). The builder stage needs what
# scripts/setup.sh installs on a machine: libclang for the rocksdb crate's
# bindings and a C++ compiler for RocksDB itself; protoc is vendored.
FROM rust:1.95-bookworm AS build
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends clang libclang-dev g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and RocksDB's objects between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tallyd --bin tally \
 && mkdir -p /out && cp target/release/tallyd target/release/tally /out/

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tally tally \
 && mkdir -p /var/lib/tally && chown tally /var/lib/tally
COPY --from=build /out/tallyd /out/tally /usr/local/bin/
USER tally
VOLUME /var/lib/tally
# client (gRPC), peer (Raft, node to node), HTTP (/metrics, /healthz, /readyz)
EXPOSE 7001 7101 8001
# tini forwards SIGTERM so tallyd drains in-flight requests before it exits.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["tallyd", "--listen", "0.0.0.0:7001", "--peer-listen", "0.0.0.0:7101", "--http-listen", "0.0.0.0:8001", "--data-dir", "/var/lib/tally"]
