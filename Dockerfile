# fixity's image: a static musl binary on a distroless base, pinned by digest and run as a
# non-root user. fixity denies images that are not pinned by digest, and its own image is no
# exception: deploy it as ghcr.io/fixity-dev/fixity@sha256:... (the Helm chart does).
#
#   docker build -t fixity .        (BuildKit, the default builder since Docker 23, for the
#                                    cache mounts below)
#
# Base images are pinned by the digest of their multi-arch index; the tag beside each digest
# is for people. To update a pin, resolve the tag again and replace both:
#   crane digest docker.io/library/rust:<version>-alpine3.23
#   crane digest gcr.io/distroless/static-debian12:nonroot
# The image is linux/amd64: on other hosts build with `docker build --platform linux/amd64 .`

# ---- build ------------------------------------------------------------------------------
# Official Rust image on Alpine: its native target is x86_64-unknown-linux-musl and it ships
# gcc and musl-dev, which ring (rustls' crypto) needs to compile its C and assembly.
FROM docker.io/library/rust:1.95.0-alpine3.23@sha256:606fd313a0f49743ee2a7bd49a0914bab7deedb12791f3a846a34a4711db7ed2 AS build

WORKDIR /src

# Only what the build reads (.dockerignore keeps the rest out of the context).
COPY . .

# --locked: the committed Cargo.lock is the dependency set that was tested.
# The caches speed up rebuilds and never end up in a layer; the binary is copied out of the
# cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
    && mkdir -p /out \
    && cp target/x86_64-unknown-linux-musl/release/fixity /out/fixity

# ---- runtime ----------------------------------------------------------------------------
# distroless static: CA certificates, /etc/passwd with nonroot (65532), tzdata; no shell and
# no package manager.
FROM gcr.io/distroless/static-debian12:nonroot@sha256:afa5c872c891853ca7fcf1f12c3edb23f7eeef36189728842dd51042ff57f7ab

LABEL org.opencontainers.image.title="fixity" \
      org.opencontainers.image.description="Kubernetes admission webhook that keeps workloads immutable" \
      org.opencontainers.image.source="https://github.com/fixity-dev/fixity" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/fixity /fixity

USER 65532:65532
# 8443: webhook (HTTPS); 8080: /livez, /readyz, /metrics (HTTP).
EXPOSE 8443 8080
ENTRYPOINT ["/fixity"]
CMD ["serve"]
