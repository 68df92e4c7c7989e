#!/usr/bin/env bash
# README command 1: set up on first run (.venv, pip packages, Debian's data packages), then the
# default main job: SimCLR on Fashion-MNIST with 2 CPU workers in local Ray. Extra arguments go
# to train.py (e.g. --config experiments/text_wordnet.yaml, --max-steps 100, --name other-run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_data_packages  # scripts/debian-packages.txt: Fashion-MNIST, WordNet, Noto Color Emoji, CLDR names
cd "$ROOT"
exec python train.py "$@"
