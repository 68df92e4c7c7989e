#!/usr/bin/env bash
# README command 2: set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_data_packages  # scripts/debian-packages.txt: what the tests and the shipped configs read
cd "$ROOT"
# one test file per process, DCL_TEST_WORKERS of them (0: none, all in this one); most tests wait
# on Ray starting its processes, so two share two cores well
exec python -m pytest -q -n "${DCL_TEST_WORKERS:-2}" --dist loadfile "$@"
