# syntax=docker/dockerfile:1
# Build: cmake is needed by pingora's zlib-ng, a C compiler and make by ring/zstd/SQLite
# and jemalloc (all in the rust image but cmake).
FROM rust:1-bookworm AS builder
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
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
USER tollgate
WORKDIR /var/lib/tollgate
# Mount the config at /etc/tollgate/config.toml; keep the journal on a volume.
ENV TOLLGATE_CONFIG=/etc/tollgate/config.toml \
    TOLLGATE_DB=/var/lib/tollgate/tollgate.db \
    TOLLGATE_LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/tollgate"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
