#!/usr/bin/env bash
# `make docker-bases`: make sure the base images of docker/Dockerfile and docker-compose.yml
# exist. Each is pulled when a registry can be reached; when none can (an offline machine), a
# local stand-in is built from Debian packages and tagged with the same name, so that the real
# Dockerfiles and compose files build unchanged:
#   * python:3.11-slim  <- a debootstrap'd Debian bookworm rootfs with python3.11 and pip,
#                          imported with `docker import` (docker/bases/Dockerfile.python)
#   * prom/prometheus:* <- Debian's prometheus package on that rootfs
#                          (docker/bases/Dockerfile.prometheus)
# Users with Docker Hub never need this. Images that already exist are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS_TAG="dymu-bases/bookworm:minbase"
PY_IMAGE="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' docker/Dockerfile | head -n 1)"
PROM_IMAGE="$(sed -n 's/^ *image: *\(prom\/prometheus[^ ]*\).*/\1/p' docker-compose.yml | head -n 1)"

have() { docker image inspect "$1" >/dev/null 2>&1; }

pull() {  # a registry that cannot be reached fails fast enough
    echo "docker-bases: pulling $1"
    timeout "${PULL_TIMEOUT:-45}" docker pull -q "$1" >/dev/null 2>&1
}

rootfs() {  # a minimal bookworm rootfs as an image (debootstrap, then docker import)
    have "$ROOTFS_TAG" && return
    command -v debootstrap >/dev/null || {
        echo "docker-bases: installing debootstrap"
        apt-get install -y -qq debootstrap >/dev/null
    }
    local dir
    dir="$(mktemp -d /var/tmp/dymu-rootfs.XXXXXX)"
    echo "docker-bases: debootstrap bookworm (minbase) from $MIRROR"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$dir" "$MIRROR" \
        >"$dir.log" 2>&1 || { tail -n 20 "$dir.log"; return 1; }
    rm -f "$dir.log"
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/*
    tar -C "$dir" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' - "$ROOTFS_TAG" >/dev/null
    rm -rf "$dir"
}

standin() {  # image tag, Dockerfile under docker/bases/
    echo "docker-bases: building the stand-in $1 from Debian packages ($2)"
    rootfs
    docker build -q --network host --build-arg "ROOTFS=$ROOTFS_TAG" -t "$1" \
        -f "docker/bases/$2" docker/bases >/dev/null
}

for pair in "$PY_IMAGE:Dockerfile.python" "$PROM_IMAGE:Dockerfile.prometheus"; do
    image="${pair%:*}"
    if have "$image"; then
        echo "docker-bases: $image is there"
    elif pull "$image"; then
        echo "docker-bases: pulled $image"
    else
        standin "$image" "${pair##*:}"
    fi
done
