# One image for the four services; compose picks the binary with `command`.
# Needs BuildKit (the `RUN --mount` cache mounts): Docker 23+ uses it by default, and `docker compose`
# always does. No `# syntax=` line: the built-in Dockerfile frontend is enough, and a build machine
# without a registry could not fetch another one.

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what cargo needs, so editing the README or compose file does not rebuild the binaries.
COPY Cargo.toml Cargo.lock ./
COPY crates/ crates/
COPY tests/ tests/
# The shipped binaries carry no debug info (the release profile keeps line tables for the benchmark).
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=true
# Cache mounts keep the registry and compiled dependencies between builds, so a code change
# recompiles only the workspace crates.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p features -p model -p metric -p trainer \
    && mkdir -p /out \
    && cp target/release/features target/release/model target/release/metric target/release/trainer /out/

# ONNX Runtime for users' .onnx models: the shared library inside the onnxruntime wheel on PyPI (the
# `ort` crate opens it at run time from ORT_DYLIB_PATH; the JSON linear model never does). Same pin as
# tests/models/requirements.txt. Built on the Rust image: it trusts the build machine's certificates.
FROM rust:1-bookworm AS onnxruntime
ARG ONNXRUNTIME_VERSION=1.32.0
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null \
    && rm -rf /var/lib/apt/lists/*
RUN PIP_CERT=/etc/ssl/certs/ca-certificates.crt python3 -m pip download -q --no-deps --only-binary=:all: \
       -d /wheel "onnxruntime==${ONNXRUNTIME_VERSION}" \
    && python3 -m zipfile -e /wheel/onnxruntime-*.whl /wheel/unpacked \
    && mkdir -p /out \
    && cp /wheel/unpacked/onnxruntime/capi/libonnxruntime.so.${ONNXRUNTIME_VERSION} \
          /wheel/unpacked/onnxruntime/LICENSE /wheel/unpacked/onnxruntime/ThirdPartyNotices.txt /out/

FROM debian:bookworm-slim
# amqps:// goes through native-tls, i.e. the system's OpenSSL (libssl3), which verifies brokers
# against the system CA store (ca-certificates) unless AMQP_CA_FILE adds a CA.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libssl3 ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
COPY --from=onnxruntime /out/ /usr/local/lib/onnxruntime/
ENV ORT_DYLIB_PATH=/usr/local/lib/onnxruntime/libonnxruntime.so.1.32.0
COPY scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint
WORKDIR /app
# The data set, so the image runs without a mount (Kubernetes); compose mounts ./data over it.
COPY data/diabetes.csv /app/data/diabetes.csv
# Compose mounts ./data read-only, ./models (model and trainer), and ./logs for the metric service. Unmounted, the
# folders belong to the unprivileged user the entrypoint runs the services as.
RUN mkdir -p /app/data /app/logs /app/models && chown 1000:1000 /app/logs /app/models
# Starts as root only to pick the user (see the entrypoint), then runs the service without privileges.
ENTRYPOINT ["docker-entrypoint"]
CMD ["features", "--help"]
