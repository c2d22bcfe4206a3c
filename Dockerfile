# syntax=docker/dockerfile:1
# The `tollgate` gateway and the `tollgate-pipeline` billing pipeline in one small image.
#   docker build -t tollgate:local .
#   docker run tollgate:local serve --config /etc/tollgate/tollgate.toml
#   docker run --entrypoint tollgate-pipeline tollgate:local --help
# Build stage: the workspace with the locked dependencies; librdkafka is compiled from source
# (it needs a C and a C++ compiler and make, nothing else). Rust 1.89: the oldest release the
# locked dependencies accept (clickhouse, uuid).
ARG RUST_VERSION=1.89
FROM rust:${RUST_VERSION}-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate --bin tollgate-pipeline \
 && mkdir -p /out \
 && cp target/release/tollgate target/release/tollgate-pipeline /out/

# Runtime stage: Debian slim (glibc, bash for the compose healthchecks), CA certificates for
# TLS to providers, no compiler, no shell tools beyond the base; runs as an unprivileged user.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid tollgate --home-dir /var/lib/tollgate --create-home \
      --shell /usr/sbin/nologin tollgate
COPY --from=build /out/tollgate /out/tollgate-pipeline /usr/local/bin/
USER 10001:10001
WORKDIR /var/lib/tollgate
# the data directory: the embedded store, or with Kafka events the disk spool
ENV TOLLGATE_DATA_DIR=/var/lib/tollgate
VOLUME ["/var/lib/tollgate"]
# API, gateway metrics (server.metrics_listen), pipeline metrics (--metrics-listen)
EXPOSE 8080 9464 9465
ENTRYPOINT ["tollgate"]
CMD ["serve"]
