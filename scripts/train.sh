#!/usr/bin/env bash
# README command 1: set up on first run (.venv, pip packages, Debian's dataset-fashion-mnist),
# then the default main job: SimCLR on Fashion-MNIST with 2 CPU workers in local Ray.
# Extra arguments go to train.py (e.g. --max-steps 100, --name other-run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
cd "$ROOT"
exec python train.py "$@"
