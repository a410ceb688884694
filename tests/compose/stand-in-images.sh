#!/usr/bin/env bash
# Test tooling for scripts/compose-test, never part of the project's images: makes sure the base
# images that Dockerfile and docker-compose.yml name exist in the local Docker engine. It pulls the
# real ones where a registry answers; where none does (an offline build machine) it builds local
# stand-ins under the same tags:
#   debian:bookworm-slim   from debootstrap and the Debian mirror
#   rabbitmq:3-management  Debian's rabbitmq-server, management and prometheus plugins on (as in the
#                          real image), loopback_users = none,
#                          in the foreground, rabbitmq-diagnostics on PATH
#   rust:1-bookworm        this machine's Rust toolchain and OpenSSL's headers, trusting this machine's certificates so
#                          cargo inside `docker build` reaches crates.io through a proxy
#   prom/prometheus:v2.53.1  Debian's prometheus (2.42), laid out as the real image: entrypoint
#                          /bin/prometheus, user nobody, /prometheus as the data volume
# grafana/grafana has no stand-in (no Debian package): the compose test starts Prometheus alone.
# An image already present is kept, so a rerun does nothing.
set -euo pipefail

mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="$(mktemp -d)"
trap 'as_root rm -rf "$work"' EXIT

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
say() { echo "stand-in-images: $*" >&2; }
# The legacy builder is enough for these plain Dockerfiles and needs no buildx plugin.
build() {
  DOCKER_BUILDKIT=0 docker build "$@" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; return 1; }
}

# Returns 0 when the image is there (already, or pulled now).
present_or_pulled() {
  have_image "$1" && return 0
  if timeout "${PULL_TIMEOUT_SECS:-60}" docker pull -q "$1" >/dev/null 2>&1; then
    say "pulled $1"
    return 0
  fi
  say "cannot pull $1: building a local stand-in"
  return 1
}

if ! present_or_pulled debian:bookworm-slim; then
  command -v debootstrap >/dev/null || { say "debootstrap is not installed"; exit 1; }
  as_root debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  as_root sh -c 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb
    echo "deb $2 bookworm main" >"$1/etc/apt/sources.list"' - "$work/rootfs" "$mirror"
  as_root tar -C "$work/rootfs" -c . | docker import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  say "built debian:bookworm-slim"
fi

if ! present_or_pulled rabbitmq:3-management; then
  mkdir -p "$work/rabbitmq"
  cat >"$work/rabbitmq/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus >/dev/null \
    && printf 'loopback_users = none\nlisteners.tcp.default = 5672\nmanagement.tcp.port = 15672\n' \
       >/etc/rabbitmq/rabbitmq.conf
ENV PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/local/sbin:/usr/local/bin:/usr/bin:/sbin:/bin
VOLUME /var/lib/rabbitmq
EXPOSE 5672 15672 15692
CMD ["rabbitmq-server"]
DOCKERFILE
  build -t rabbitmq:3-management "$work/rabbitmq"
  say "built rabbitmq:3-management"
fi

# The real image has OpenSSL's headers (native-tls builds against them); a stand-in made before
# the services used TLS does not: build it again.
if have_image rust:1-bookworm \
   && ! docker run --rm --entrypoint test rust:1-bookworm -e /usr/include/openssl/ssl.h; then
  say "rust:1-bookworm has no OpenSSL headers: building the stand-in again"
  docker image rm rust:1-bookworm >/dev/null
fi

if ! present_or_pulled rust:1-bookworm; then
  toolchain="$(rustc --print sysroot)"
  mkdir -p "$work/rust/toolchain" "$work/rust/certs"
  # The compiler, cargo and the host's standard library; not the docs or sources.
  tar -C "$toolchain" --exclude=./share/doc --exclude=./share/man --exclude=./lib/rustlib/src \
      --exclude=./lib/rustlib/rustc-src -c . | tar -C "$work/rust/toolchain" -x
  cp /usr/local/share/ca-certificates/*.crt "$work/rust/certs/" 2>/dev/null || true
  cat >"$work/rust/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       ca-certificates gcc libc6-dev pkg-config make git libssl-dev >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
COPY toolchain/ /usr/local/rustup/toolchains/stable/
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rustup/toolchains/stable/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && cargo --version && rustc --version
DOCKERFILE
  build -t rust:1-bookworm "$work/rust"
  say "built rust:1-bookworm"
fi

if ! present_or_pulled prom/prometheus:v2.53.1; then
  mkdir -p "$work/prometheus"
  cat >"$work/prometheus/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && { [ -e /bin/prometheus ] || ln -s /usr/bin/prometheus /bin/prometheus; } \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
VOLUME /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DOCKERFILE
  build -t prom/prometheus:v2.53.1 "$work/prometheus"
  say "built prom/prometheus:v2.53.1"
fi
