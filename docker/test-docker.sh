#!/usr/bin/env bash
# `make test-docker`: the README's `docker compose up` for real, then checked and torn down.
#   1. Debian's docker.io and docker-compose are installed when missing; dockerd is started when
#      it is not running (and stopped at the end if this script started it);
#   2. `make docker-bases`: the base images, or their offline stand-ins (docker/bases/);
#   3. tests/test_docker.py (pytest -m docker): `docker-compose up -d --build`, waits for the
#      API's healthcheck, posts a preference and predictions on service/example.png, asks
#      Prometheus that up{job="dymu"} is 1 and that the request counter counts them, and
#      `docker-compose down -v` (nothing is left running); then tests/test_docker_ray.py, the
#      same for docker-compose.ray.yml (dymu on Ray Serve, 2 replicas, in one container).
# Usage: docker/test-docker.sh PYTHON   (the project's .venv python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
STATE="${TMPDIR:-/tmp}/dymu-test-docker"
mkdir -p "$STATE"

install_missing() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "test-docker: installing ${missing[*]} (apt-get)"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_engine() {
    docker info >/dev/null 2>&1 && return
    echo "test-docker: starting dockerd (log: $STATE/dockerd.log)"
    $SUDO dockerd >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    tail -n 20 "$STATE/dockerd.log"
    echo "test-docker: dockerd did not start" >&2
    return 1
}

stop_engine() {  # only the dockerd this script started
    [ -f "$STATE/dockerd.pid" ] || return 0
    local pid
    pid="$(cat "$STATE/dockerd.pid")"
    rm -f "$STATE/dockerd.pid"
    echo "test-docker: stopping the dockerd it started (pid $pid)"
    $SUDO kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
}

install_missing
start_engine
trap stop_engine EXIT
make docker-bases
# Where torch comes from: the public CPU index when it answers, else this machine's pip
# configuration (docker/pip/, written by make docker-bases).
if ! "$PY" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=10)" 2>/dev/null; then
    export DYMU_PIP_CONF=pip.conf DYMU_TORCH_INDEX=
    echo "test-docker: the PyTorch index cannot be reached: building with docker/pip/pip.conf"
fi
"$PY" -m pytest -q -s -m docker tests/test_docker.py tests/test_docker_ray.py  # -s: times
