#!/usr/bin/env bash
# Installs what sand-bench needs: a venv with pinned Celery (Redis transport), the Redis client,
# Ray, Restate's Python SDK and Hypercorn (the ASGI server its endpoint runs in) for the
# baseline scripts beside this file, numpy for sand's grains in the cold-start and memory parts,
# a redis-server binary, and Restate's server from npm, linked as VENV/bin/restate-server.
# Idempotent: parts already in place are checked and skipped. A part that fails is reported on
# stderr and the others still run; the exit status is 0 only when every part is in.
#
# Usage: setup.sh VENV_DIR
set -u

CELERY_VERSION=5.7.0
REDIS_PY_VERSION=8.1.0
RAY_VERSION=2.60.0
RESTATE_SDK_VERSION=1.2.0
HYPERCORN_VERSION=0.18.0
RESTATE_SERVER_VERSION=1.7.12
NUMPY_VERSION=2.4.6
# The venv's base: the system's interpreter, so that a sandbox (which has the system
# directories) runs the venv's python with only the venv mounted.
BASE_PYTHON=/usr/bin/python3

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
failed=()

progress() { echo "setup: $*" >&2; }
fail() {
    echo "setup: FAILED: $*" >&2
    failed+=("$1")
}

# pip_pin PACKAGE_SPEC IMPORT_NAME VERSION LABEL: installs the pin unless the venv already
# imports IMPORT_NAME and has the distribution LABEL names (its first word) at exactly VERSION.
pip_pin() {
    local spec=$1 module=$2 version=$3 label=$4
    local check="import sys, importlib.metadata, $module
sys.exit(importlib.metadata.version('${label%% *}') != '$version')"
    if "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
        progress "$label $version already installed"
        return 0
    fi
    progress "installing $label $version ..."
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
        "$spec" >&2; then
        fail "$label" "pip install $spec"
        return 1
    fi
    if ! "$VENV/bin/python" -c "$check"; then
        fail "$label" "$label installed but 'import $module' fails or its version is not $version"
        return 1
    fi
    progress "$label $version installed"
}

# 1. The venv, made with the system's python3; one made with another is made again.
if [ -x "$VENV/bin/python" ] && grep -qx "home = $(dirname "$BASE_PYTHON")" "$VENV/pyvenv.cfg" 2>/dev/null; then
    progress "venv $VENV already exists ($("$VENV/bin/python" --version 2>&1))"
    venv_ok=1
else
    if [ -e "$VENV" ]; then
        progress "venv $VENV was not made with $BASE_PYTHON; making it again"
        rm -rf "$VENV"
    fi
    progress "creating venv $VENV with $BASE_PYTHON ($("$BASE_PYTHON" --version 2>&1)) ..."
    if "$BASE_PYTHON" -m venv "$VENV"; then
        venv_ok=1
    else
        fail venv "$BASE_PYTHON -m venv $VENV"
        venv_ok=0
    fi
fi

# 2. Python packages, each pinned exactly.
if [ "$venv_ok" = 1 ]; then
    pip_pin "celery[redis]==$CELERY_VERSION" celery "$CELERY_VERSION" celery
    pip_pin "redis==$REDIS_PY_VERSION" redis "$REDIS_PY_VERSION" "redis (python client)"
    pip_pin "ray==$RAY_VERSION" ray "$RAY_VERSION" ray
    pip_pin "restate-sdk==$RESTATE_SDK_VERSION" restate "$RESTATE_SDK_VERSION" restate-sdk
    pip_pin "hypercorn==$HYPERCORN_VERSION" hypercorn "$HYPERCORN_VERSION" hypercorn
    pip_pin "numpy==$NUMPY_VERSION" numpy "$NUMPY_VERSION" numpy
else
    for part in celery ray restate-sdk hypercorn numpy; do
        fail "$part" "skipped: no venv"
    done
fi

# 3. A redis-server binary. Debian's package would start the system service on install; a
# policy-rc.d that denies every start keeps it down (the scripts run their own servers), and
# any system instance that runs anyway is stopped and disabled.
stop_system_redis() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    if [ -x /etc/init.d/redis-server ]; then
        /etc/init.d/redis-server stop >/dev/null 2>&1 || true
        update-rc.d redis-server disable >/dev/null 2>&1 || true
    fi
    if [ -f /run/redis/redis-server.pid ]; then
        kill "$(cat /run/redis/redis-server.pid)" 2>/dev/null || true
    fi
}

if command -v redis-server >/dev/null 2>&1; then
    progress "redis-server already on PATH: $(redis-server --version)"
else
    progress "installing redis-server with apt-get ..."
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    if { apt-get update >&2 || true; } && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends redis-server >&2; then
        progress "redis-server installed: $(redis-server --version)"
    else
        fail redis-server "apt-get install -y redis-server"
    fi
    [ "$made_policy" = 1 ] && rm -f "$policy"
    stop_system_redis
fi

# 4. Restate's server: the npm package ships the binary for this platform in an optional
# dependency (no download at install or at run time). Its install scripts are not run (the
# only one is a usage report). VENV/bin/restate-server links that binary, so the bench runs it
# without node in between.
restate_server=$VENV/bin/restate-server
if "$restate_server" --version 2>/dev/null | grep -qx "restate-server $RESTATE_SERVER_VERSION"; then
    progress "restate-server $RESTATE_SERVER_VERSION already installed"
elif ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    fail restate-server "no node and npm on PATH"
elif [ ! -d "$VENV/bin" ]; then
    fail restate-server "skipped: no venv"
else
    progress "installing @restatedev/restate-server $RESTATE_SERVER_VERSION with npm $(npm --version) (node $(node --version)) ..."
    prefix=$VENV/restate-server
    if npm install --prefix "$prefix" --no-audit --no-fund --ignore-scripts --no-save \
        "@restatedev/restate-server@$RESTATE_SERVER_VERSION" >&2 \
        && binary=$(cd "$prefix" && node -p \
            "require.resolve('@restatedev/restate-server-' + process.platform + '-' + process.arch + '/bin/restate-server')") \
        && ln -sf "$binary" "$restate_server" \
        && "$restate_server" --version 2>/dev/null | grep -qx "restate-server $RESTATE_SERVER_VERSION"; then
        progress "restate-server $RESTATE_SERVER_VERSION installed: $binary"
    else
        fail restate-server "npm install @restatedev/restate-server@$RESTATE_SERVER_VERSION, or its binary does not run here"
    fi
fi

if [ ${#failed[@]} -ne 0 ]; then
    echo "setup: incomplete; failed parts: ${failed[*]}" >&2
    exit 1
fi
progress "all parts in: venv $VENV, celery $CELERY_VERSION, redis-py $REDIS_PY_VERSION, ray $RAY_VERSION, restate-sdk $RESTATE_SDK_VERSION, hypercorn $HYPERCORN_VERSION, restate-server $RESTATE_SERVER_VERSION, numpy $NUMPY_VERSION, $(redis-server --version | cut -d' ' -f1-3)"
