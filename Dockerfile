# syntax=docker/dockerfile:1
# idemgate container image. Multi-stage: the dependencies are compiled in a
# layer of their own (against dummy sources, so editing src/ does not rebuild
# them), then a --locked release build, copied into a slim Debian runtime that
# runs as a non-root user. See docs/operations.md ("Container image").
#
#   docker build -t idemgate .                     # the proxy (the default, last stage)
#   docker build --target erp -t idemgate-erp .    # the example ERP upstream, for demos
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/idemgate.yaml:/etc/idemgate/idemgate.yaml:ro" idemgate
#
# Configuration: mounted at /etc/idemgate/idemgate.yaml (IDEMGATE_CONFIG).
# Ports: 8080 proxy (`listen`), 9090 admin (`admin.listen`); the config must
# listen on 0.0.0.0 (not 127.0.0.1) to be reachable from outside the container.
# Health check: GET /healthz on the admin listener through bash's /dev/tcp
# (the image has no curl); set IDEMGATE_HEALTHCHECK_ADDR if admin.listen is
# not on port 9090.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

# ---- dependencies: only Cargo.toml and Cargo.lock, dummy sources ----------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS deps
# rust:*-slim ships gcc and libc6-dev, which ring (rustls) and mimalloc (the
# allocator) need.
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && cargo build --release --locked --bin idemgate \
 && rm -rf src

# ---- the proxy ------------------------------------------------------------
FROM deps AS build
COPY src ./src
# COPY keeps the sources' old mtimes: touch them so cargo rebuilds the crate
# instead of trusting the dummy build above.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin idemgate \
 && install -D -m 0755 target/release/idemgate /out/idemgate \
 && /out/idemgate --version

# ---- the example ERP upstream (demo only; builds the dev-dependencies) ----
FROM build AS build-erp
COPY examples ./examples
RUN cargo build --release --locked --example erp \
 && install -D -m 0755 target/release/examples/erp /out/erp

# ---- runtime base: slim Debian, CA roots for https upstreams, a user ------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# Unpinned on purpose: ca-certificates should be the release's current one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 idemgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
      --no-create-home --shell /usr/sbin/nologin idemgate \
 && mkdir -p /etc/idemgate

# ---- the example ERP image: docker build --target erp ---------------------
FROM runtime AS erp
COPY --from=build-erp /out/erp /usr/local/bin/erp
USER 10001:10001
EXPOSE 9000
# The example stops on Ctrl-C (SIGINT) only.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/erp"]
CMD ["--listen", "0.0.0.0:9000"]

# ---- the idemgate image (default target) ----------------------------------
FROM runtime AS idemgate
COPY --from=build /out/idemgate /usr/local/bin/idemgate
COPY --chmod=0755 deploy/docker/healthcheck.sh /usr/local/bin/idemgate-healthcheck
ENV IDEMGATE_CONFIG=/etc/idemgate/idemgate.yaml \
    IDEMGATE_HEALTHCHECK_ADDR=127.0.0.1:9090
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080 9090
# serve drains in-flight exchanges on SIGTERM (up to shutdown_grace), then
# exits 0; SIGHUP reloads the configuration file.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/idemgate-healthcheck", "/healthz"]
ENTRYPOINT ["/usr/local/bin/idemgate"]
CMD ["serve"]
