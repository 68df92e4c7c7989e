#!/usr/bin/env bash
# README command 2: set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_data_packages  # scripts/debian-packages.txt: what the tests and the shipped configs read
cd "$ROOT"
# DCL_TEST_WORKERS=N: the test files on N pytest-xdist processes. Off by default: on 2 cores two
# Ray-heavy files at once push the sweep and cluster tests past their timeouts (measured).
exec python -m pytest -q -n "${DCL_TEST_WORKERS:-0}" --dist loadfile "$@"
