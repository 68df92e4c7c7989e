"""Typed config: YAML + overrides, every bad field named, errors before Ray starts."""

from pathlib import Path

import pytest
import ray

import train
from distributed_cl.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.name=digits"]


@pytest.mark.parametrize("name", ["image_simclr.yaml", "image_simclr_long.yaml", "image_supcon.yaml"])
def test_shipped_configs_validate(name, tmp_path):
    config = Config.load(ROOT / "experiments" / name, ["data.name=digits"])
    assert config.train.global_batch_size % config.train.num_workers == 0


def test_overrides_and_flags_reach_the_config():
    args = train.parse_args(["--num-workers", "4", "--max-steps", "7", "--name", "x", "--set", "loss.temperature=0.2"])
    config = Config.load(ROOT / "experiments/image_simclr.yaml", train.overrides_from_flags(args) + ["data.name=digits"])
    assert (config.train.num_workers, config.train.max_steps, config.train.name) == (4, 7, "x")
    assert config.loss.temperature == 0.2 and config.train.epochs is None
    args = train.parse_args(["--epochs", "3"])
    config = Config.load(None, train.overrides_from_flags(args) + ["data.name=digits"])
    assert (config.train.epochs, config.train.max_steps) == (3, None)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["loss.temperture=0.1"], "unknown config key loss.temperture"),
        (["optimizer.lr=0.1"], "unknown config key optimizer"),
        (["loss.temperature=0"], "loss.temperature must be > 0"),
        (["loss.temperature=hot"], "loss.temperature must be float"),
        (["train.num_workers=3"], "global_batch_size=256 is not divisible by train.num_workers=3"),
        (["loss.name=supcon", "loss.m=3"], "loss.m=3 does not divide train.global_batch_size=256"),
        (["loss.name=supcon", "loss.m=1"], "loss.m must be >= 2"),
        (["loss.name=triplet"], "loss.name must be one of"),
        (["train.max_steps=null"], "exactly one of train.max_steps and train.epochs"),
        (["train.epochs=2"], "exactly one of train.max_steps and train.epochs"),
        (["data.name=fashion_mnist", "data.root=/nonexistent/fm"], "data.root: /nonexistent/fm does not exist"),
        (["data.crop_scale_min=0"], r"data.crop_scale_min must be in \(0.0, 1.0\]"),
        (["train.use_gpu=yes please"], "train.use_gpu must be bool"),
        (["data.blur=-1"], r"data.blur must be in \[0.0, 5.0\]"),
        (["train.loader_workers=-1"], "train.loader_workers must be >= 0"),
        (["train.grad_cache_chunk=0"], "train.grad_cache_chunk must be >= 1"),
        (["loss.chunk_size=0"], "loss.chunk_size must be >= 1"),
        (["loss.name=clip", "loss.decoupled=true"], "loss.decoupled applies to ntxent, infonce, not to loss.name=clip"),
        (["loss.name=supcon", "loss.hard_negative_beta=1"], "loss.hard_negative_beta applies to ntxent, infonce"),
        (["loss.hard_negative_beta=-1"], "loss.hard_negative_beta must be a finite number >= 0"),
        (["loss.name=ntxent", "loss.init_bias=-5"], "loss.init_bias applies to siglip, not to loss.name=ntxent"),
        (["loss.name=siglip", "loss.init_scale=0"], "loss.init_scale must be > 0"),
        (["loss.name=clip", "loss.neighbour_exchange=true"], "loss.neighbour_exchange applies to siglip"),
        (["loss.chunk_size=big"], "loss.chunk_size"),
        (["train=5"], "train must be a mapping"),
        (["task=audio"], "task must be one of image, text, image_text"),
        (["task=text", "text.root=/nonexistent/wn"], "text.root: no WordNet database at /nonexistent/wn .*wordnet-base"),
        (["task=text", "text.tower.model=/nonexistent/m"], "text.tower.model: /nonexistent/m is not a local model directory"),
        (["task=text", "text.tower.max_length=1"], "text.tower.max_length must be >= 2"),
        (["task=text", "text.tower.layers=2"], "unknown config key text.tower.layers"),
        (["task=image_text", "image_text.font=/nonexistent/f.ttf"], "image_text.font: .*fonts-noto-color-emoji"),
        (["task=image_text", "image_text.image_tower.encoder=vit"], "image_text.image_tower.encoder must be one of"),
        (["temperature"], "section.field=value"),
    ],
)
def test_bad_config_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, ["data.name=digits"] + overrides)


def test_yaml_sections_must_be_mappings(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {name: digits}\ntrain: 5\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        Config.load(path)


def test_config_errors_stop_train_py_before_ray_starts(capsys):
    assert not ray.is_initialized()
    assert train.main([*DIGITS, "--set", "loss.temperature=-1"]) == 2
    assert "loss.temperature must be > 0" in capsys.readouterr().err
    assert not ray.is_initialized()
