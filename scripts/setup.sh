#!/usr/bin/env bash
# Create or reuse .venv and install the project with its text-model, test and benchmark extras.
# Idempotent: reinstalls only when pyproject.toml or scripts/constraints.txt change.
# Source it (`. scripts/setup.sh`) to get the venv activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DCL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/scripts/constraints.txt" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 ships venv separately
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv "$VENV"
    fi
fi
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$(stamp_of)" ]; then
    echo "setup: installing distributed_cl and its dependencies into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c "$ROOT/scripts/constraints.txt" -e "$ROOT[dev,bench,text]"
    stamp_of > "$VENV/.installed"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Debian packages, installed once, only those missing.
need_debian_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing Debian's ${missing[*]}"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The data packages of scripts/debian-packages.txt (one list for both README commands).
need_data_packages() {
    # shellcheck disable=SC2046
    need_debian_packages $(sed 's/#.*//' "$ROOT/scripts/debian-packages.txt")
}
