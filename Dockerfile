# cubicled in a container: build with the Swift toolchain image, run on a slim Debian with only what the
# binaries need. Run it privileged with the host's cgroup namespace (docs/deploy.md):
#   docker build -t cubicle .
#   docker run --rm --privileged --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw -p 8080:8080 cubicle
ARG SWIFT_VERSION=6.3
FROM swift:${SWIFT_VERSION}-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp-dev libnftables-dev libarchive-dev libsqlite3-dev libcap-dev make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same step as on a host: release build with the Swift runtime linked in, installed under /staging.
RUN make install DESTDIR=/staging PREFIX=/usr/local SYSTEMD_UNIT_DIR=

FROM debian:bookworm-slim
# libseccomp2 for cubicled's filter compiler, libnftables1 for PUBLIC sessions' egress rules, libarchive13 for image layers, libsqlite3-0 for the runtime store, libstdc++ for the static Swift runtime; the sandboxes bind this
# image's /usr, /lib and /etc files read-only, so what agents need (python3, certificates) is added here.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libseccomp2 libnftables1 libarchive13 libsqlite3-0 libstdc++6 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /staging/ /
EXPOSE 8080
STOPSIGNAL SIGTERM
# The admin socket is /run/cubicle/admin.sock inside the container: `docker exec CONTAINER cubicle ps`.
# A published port must be reachable from outside the container's own namespace, and cubicled checks no
# caller yet: --insecure-no-auth says so. Publish it on the host's loopback (-p 127.0.0.1:8080:8080) or put
# an authenticating proxy in front (docs/security.md).
ENTRYPOINT ["/usr/local/bin/cubicled", "--listen", "0.0.0.0:8080", "--insecure-no-auth"]
