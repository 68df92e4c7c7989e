#!/usr/bin/env bash
# README command 2: set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_debian_packages wordnet-base fonts-noto-color-emoji unicode-data  # the text and image-text tests
cd "$ROOT"
exec python -m pytest -q "$@"
