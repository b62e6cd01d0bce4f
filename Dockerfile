# syntax=docker/dockerfile:1
#
# The lakecache image: every binary in one image (lakecache, lakecache-worker,
# lakecache-operator, lakecache-csi-node); the Helm chart picks one per container.
#
#   docker build -t ghcr.io/lakecache/lakecache:0.1.0 .
#
# This Dockerfile is for users with Docker (BuildKit); it is not built in the repository's tests,
# whose machines have no Docker engine (and no network beyond package registries). The tests build
# the same image with scripts/image instead (mmdebstrap and umoci, no Docker; e2e/tests/image.rs),
# from the workspace's binaries and the same two lists this file reads: image/packages (the Debian
# packages) and image/binaries (the binaries, each also the Cargo package that builds it). The test
# also checks that this file and scripts/image set the same user, fuse.conf line, CMD and labels:
# change them in both.
#
# Build: no system protoc (the .proto files are compiled with protox, in Rust) and no libfuse
# (fuser is built without it); rustls everywhere, so no OpenSSL. aws-lc-sys (rustls's default
# provider, pulled in by reqwest) compiles C with the image's gcc.
#
# Runtime: Debian bookworm-slim with the packages in image/packages: fuse3 (fusermount3, and
# /etc/fuse.conf for allow_other) and ca-certificates (HTTPS to the object stores). The default
# user is an unprivileged one, which the operator and the cache workers run as; the CSI plugin and
# mounter containers run as root, privileged, by the chart's securityContext.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: cargo loads every member's manifest even when building a few packages (the
# ones named in image/binaries, which is copied in with the rest).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    packages="$(awk '{ sub(/#.*/, "") } NF { print $1 }' image/binaries)" \
    && bins="$(awk '{ sub(/#.*/, "") } NF { print $NF }' image/binaries)" \
    && cargo build --release --locked $(printf ' -p %s' $packages) \
    && mkdir -p /out \
    && for bin in $bins; do cp "target/release/$bin" /out/; done

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG APP_UID=65532
# fuse3 gives fusermount3 and /etc/fuse.conf; user_allow_other lets FUSE servers that run as a
# non-root user mount with allow_other too, so that pods (other users) can read the cache.
# The package list is bind-mounted for this step only, so it stays out of the image.
RUN --mount=type=bind,source=image/packages,target=/tmp/image-packages \
    apt-get update \
    && apt-get install -y --no-install-recommends $(sed 's/#.*//' /tmp/image-packages) \
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
