#!/usr/bin/env bash
# README command 2: set up (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
need_data_packages  # scripts/debian-packages.txt: what the tests and the shipped configs read
need_debian_packages chromium g++  # test_report.py renders the run report in a headless browser; train.compile's test: inductor compiles C++
cd "$ROOT"
# Two pytest-xdist processes: the tests that start Ray run one at a time on one of them (the
# xdist_group "ray", tests/conftest.py), the rest on the other. DCL_TEST_WORKERS=0 runs serially.
exec python -m pytest -q -n "${DCL_TEST_WORKERS:-2}" --dist loadgroup "$@"
