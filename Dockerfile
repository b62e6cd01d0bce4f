# syntax=docker/dockerfile:1
#
# The lakecache image: every binary in one image (lakecache, lakecache-worker,
# lakecache-operator, lakecache-csi-node); the Helm chart picks one per container.
#
#   docker build -t ghcr.io/lakecache/lakecache:0.1.0 .
#
# NOTE: this Dockerfile has not been built in the repository's CI or development machines, which
# have no Docker engine (and no network beyond package registries); the chart's test
# (e2e/tests/chart.rs) checks the manifests against a real kube-apiserver, not this image. Build
# it where Docker (BuildKit) is available.
#
# Build: no system protoc (the .proto files are compiled with protox, in Rust) and no libfuse
# (fuser is built without it); rustls everywhere, so no OpenSSL. aws-lc-sys (rustls's default
# provider, pulled in by reqwest) compiles C with the image's gcc.
#
# Runtime: Debian bookworm-slim with fuse3 (fusermount3, and /etc/fuse.conf for allow_other) and
# ca-certificates (HTTPS to the object stores). The default user is an unprivileged one, which
# the operator and the cache workers run as; the CSI plugin and mounter containers run as root,
# privileged, by the chart's securityContext.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: cargo loads every member's manifest even when building four packages.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p lakecache \
        -p lakecache-worker \
        -p lakecache-operator \
        -p lakecache-csi-node \
    && mkdir -p /out \
    && cp target/release/lakecache \
          target/release/lakecache-worker \
          target/release/lakecache-operator \
          target/release/lakecache-csi-node \
          /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG APP_UID=65532
# fuse3 gives fusermount3 and /etc/fuse.conf; user_allow_other lets FUSE servers that run as a
# non-root user mount with allow_other too, so that pods (other users) can read the cache.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (grep -q '^user_allow_other' /etc/fuse.conf || echo user_allow_other >> /etc/fuse.conf) \
    && groupadd --gid ${APP_UID} lakecache \
    && useradd --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lakecache
COPY --from=builder /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="lakecache" \
      org.opencontainers.image.description="A data-lake cache for ML training on Kubernetes" \
      org.opencontainers.image.source="https://github.com/lakecache/lakecache" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER ${APP_UID}:${APP_UID}
ENTRYPOINT []
CMD ["lakecache", "--help"]
