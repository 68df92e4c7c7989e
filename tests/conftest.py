"""The suite runs in an empty home directory, so that it cannot lean on anything an earlier run,
benchmark or manual step left under ~ (rendered-emoji caches in ~/.cache, a Ray token in ~/.ray,
Hugging Face caches): whatever a test needs, the test command installs or the test makes.
Set DCL_TEST_KEEP_HOME=1 to run in the real home instead."""

import atexit
import os
import shutil
import tempfile

if not os.environ.get("DCL_TEST_KEEP_HOME"):
    # before anything imports Ray or transformers, which read HOME once; subprocesses inherit it
    _home = tempfile.mkdtemp(prefix="distributed_cl-test-home-")
    os.environ["HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
