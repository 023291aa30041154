# syntax=docker/dockerfile:1
# Build: cmake is needed by pingora's zlib-ng, a C compiler and make by ring/zstd/SQLite
# and jemalloc (all in the rust image but cmake).
# Every file the build reads is copied below; tests/dockerfile.rs fails when one is not
# (Cargo.toml targets, the workspace members under crates/, include_str!/include_bytes!
# sources, the baked-in config).
FROM rust:1-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
COPY lua ./lua
COPY prices.toml ./
RUN cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=builder /src/target/release/tollgate /usr/local/bin/tollgate
# A usable default: embedded mode, the ledger on the volume, every setting overridable by
# the environment variables config.toml reads (OPENAI_API_KEY, ANTHROPIC_API_KEY,
# OPENAI_BASE_URL, TOLLGATE_ADMIN_TOKEN, …). Replace it by mounting a file over
# /etc/tollgate/config.toml, or point TOLLGATE_CONFIG at another path.
COPY config.toml /etc/tollgate/config.toml
USER tollgate
WORKDIR /var/lib/tollgate
ENV TOLLGATE_CONFIG=/etc/tollgate/config.toml \
    TOLLGATE_DB=/var/lib/tollgate/tollgate.db \
    TOLLGATE_LISTEN=0.0.0.0:8080 \
    TOLLGATE_ADMIN_LISTEN=0.0.0.0:9091
VOLUME ["/var/lib/tollgate"]
EXPOSE 8080 9091
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
