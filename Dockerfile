# One image for the three services; compose picks the binary with `command`.
# syntax=docker/dockerfile:1

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds, so a code change
# recompiles only the workspace crates.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p features -p model -p metric \
    && mkdir -p /out \
    && cp target/release/features target/release/model target/release/metric /out/

FROM debian:bookworm-slim
COPY --from=build /out/ /usr/local/bin/
WORKDIR /app
# Compose mounts ./data read-only and ./logs for the metric service.
RUN mkdir -p /app/data /app/logs && chmod 0777 /app/logs
USER 1000:1000
CMD ["features", "--help"]
