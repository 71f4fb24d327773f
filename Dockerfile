# syntax=docker/dockerfile:1
# The image scripts/build-image builds, for a machine with a container builder and a
# registry at hand:
#
#   docker build -t ghcr.io/sluice-ci/sluice:0.1.0 .      # or: buildah bud, podman build
#
# Both use scripts/image-rootfs, so the image holds the same files: the stripped
# release binary, the shared libraries it links (from the build stage's Debian), the CA
# bundle, /etc/passwd and /etc/group with the user 65532 — and nothing else. This
# repository's CI tests the buildah path (scripts/build-image, scripts/check-image),
# not this file.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice --bin sluice \
 && SOURCE_DATE_EPOCH=0 scripts/image-rootfs target/release/sluice /rootfs

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
ENTRYPOINT ["/sluice"]
