"""Typed config: YAML + overrides, every bad field named, errors before Ray starts."""

import importlib
from pathlib import Path
from typing import Literal

import pytest
import ray
import torch
import yaml

import train
from distributed_cl.config import Config, ConfigError
from distributed_cl.losses import LOSSES, NTXentLoss
from distributed_cl.losses.options import SoftmaxOptions

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.name=digits"]


SHIPPED = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("experiments/*.yaml"), *ROOT.glob("experiments/results/*/best.yaml"),
                                                     *ROOT.glob("tests/configs/*.yaml")])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_round_trip(name):
    """Every YAML the project ships parses (its files are other tests' concern), and a config
    written out (best.yaml, towers.pt) reads back the same."""
    raw = yaml.safe_load((ROOT / name).read_text())
    config = Config.from_dict(raw)
    assert Config.from_dict(config.to_dict()) == config
    assert_holds(config.to_dict(), raw)  # what the file says is what the config holds


def assert_holds(held, written, where="") -> None:
    if isinstance(written, dict):
        for key, value in written.items():
            assert_holds(held[key], value, f"{where}.{key}")
    else:
        assert held == written, where


def test_naming_another_plugin_drops_the_options_it_does_not_take():
    """`--set loss.name=siglip` over a CLIP config: the file's loss.temperature is not siglip's."""
    with pytest.warns(UserWarning, match="loss.name=siglip: loss.temperature dropped"):
        config = Config.load(ROOT / "experiments/image_text_emoji.yaml", ["loss.name=siglip"])
    assert config.loss.name == "siglip" and "temperature" not in config.loss.model_dump()
    with pytest.raises(ConfigError, match="loss.temperature applies to ntxent, infonce, clip, supcon, not to "
                                          "loss.name=siglip"):  # named in the same breath: refused
        Config.load(ROOT / "experiments/image_text_emoji.yaml", ["loss.name=siglip", "loss.temperature=0.1"])
    assert Config.load(None, ["data.name=digits", "optim.name=sgd", "optim.momentum=0.5"]).optim.momentum == 0.5


def test_overrides_and_flags_reach_the_config():
    args = train.parse_args(["--num-workers", "4", "--max-steps", "7", "--name", "x", "--set", "loss.temperature=0.2"])
    config = Config.load(ROOT / "experiments/image_simclr.yaml", train.overrides_from_flags(args) + ["data.name=digits"])
    assert (config.train.num_workers, config.train.max_steps, config.train.name) == (4, 7, "x")
    assert config.loss.temperature == 0.2 and config.train.epochs is None
    elastic = Config.load(None, ["data.name=digits", "train.num_workers=[1, 2]"]).train
    assert (elastic.num_workers, elastic.worker_range, elastic.elastic) == ((1, 2), (1, 2), True)
    args = train.parse_args(["--epochs", "3"])
    config = Config.load(None, train.overrides_from_flags(args) + ["data.name=digits"])
    assert (config.train.epochs, config.train.max_steps) == (3, None)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["loss.temperture=0.1"], "unknown config key loss.temperture"),
        (["optimizer.lr=0.1"], "unknown config key optimizer"),
        (["loss.temperature=0"], "loss.temperature must be a finite number > 0"),
        (["loss.temperature=hot"], "loss.temperature: Input should be a valid number"),
        (["train.num_workers=3"], "train.global_batch_size=256 is not divisible by train.num_workers=3"),
        (["train.num_workers=[2, 5]"], r"train.num_workers=\[2, 5\]: train.global_batch_size=256 is not divisible "
                                       "by 3, 5 workers; every count of an elastic range must split the global batch"),
        (["train.num_workers=[4, 2]"], r"train.num_workers=\[4, 2\]: the minimum is above the maximum"),
        (["train.strategy=fsdp"], "train.strategy=fsdp: the image task's encoder"),
        (["train.grad_cache_tokens=512"], "train.grad_cache_tokens counts text tokens: the image task has no texts"),
        (["loss.name=supcon", "loss.m=3"], "loss.m=3 does not divide train.global_batch_size=256"),
        (["loss.name=supcon", "loss.m=1"], "loss.m: Input should be greater than or equal to 2"),
        (["loss.name=triplet"], "loss.name must be one of"),
        (["train.max_steps=null"], "exactly one of train.max_steps and train.epochs"),
        (["train.epochs=2"], "exactly one of train.max_steps and train.epochs"),
        (["data.name=fashion_mnist", "data.root=/nonexistent/fm"], "data.root: /nonexistent/fm does not exist"),
        (["data.crop_scale_min=0"], "data.crop_scale_min: Input should be greater than 0"),
        (["train.use_gpu=yes please"], "train.use_gpu: Input should be a valid boolean"),
        (["data.blur=-1"], "data.blur: Input should be greater than or equal to 0"),
        (["train.loader_workers=-1"], "train.loader_workers: Input should be greater than or equal to 0"),
        (["train.grad_cache_chunk=0"], "train.grad_cache_chunk: Input should be greater than 0"),
        (["loss.chunk_size=0"], "loss.chunk_size must be a positive integer or None"),
        (["loss.name=clip", "loss.decoupled=true"], "loss.decoupled applies to ntxent, infonce, not to loss.name=clip"),
        (["loss.name=supcon", "loss.hard_negative_beta=1"], "loss.hard_negative_beta applies to ntxent, infonce"),
        (["loss.hard_negative_beta=-1"], "loss.hard_negative_beta must be a finite number >= 0"),
        (["loss.name=ntxent", "loss.init_bias=-5"], "loss.init_bias applies to siglip, not to loss.name=ntxent"),
        (["loss.name=siglip", "loss.init_scale=0"], "loss.init_scale must be a finite number > 0"),
        (["loss.name=clip", "loss.neighbour_exchange=true"], "loss.neighbour_exchange applies to siglip"),
        (["loss.chunk_size=big"], "loss.chunk_size"),
        (["train=5"], "train must be a mapping"),
        (["task=audio"], "task must be one of image, text, image_text"),
        (["task=text", "text.root=/nonexistent/wn"], "text.root: no WordNet database at /nonexistent/wn .*wordnet-base"),
        (["task=text", "text.tower.model=/nonexistent/m"], "text.tower.model: /nonexistent/m is not a local model directory"),
        (["task=text", "text.tower.max_length=1"], "text.tower.max_length: Input should be greater than or equal to 2"),
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
    assert "loss.temperature must be a finite number > 0" in capsys.readouterr().err
    assert not ray.is_initialized()


class ShiftedNTXent(torch.nn.Module):
    """A loss of the test's own: NT-Xent with its logits shifted (a stand-in for any new loss)."""

    def __init__(self, temperature: float, shift: float) -> None:
        super().__init__()
        if not shift >= 0:
            raise ValueError(f"shift must be >= 0, got {shift}")
        self.inner, self.shift = NTXentLoss(temperature), shift

    def forward(self, a, b, memory=None, **options):
        return self.inner(a, b, memory=memory, **options) + self.shift


class ShiftedOptions(SoftmaxOptions):
    name: Literal["shifted"] = "shifted"
    shift: float = 0.0

    def build(self) -> ShiftedNTXent:
        return ShiftedNTXent(self.temperature, self.shift)


def test_a_new_loss_is_its_options_model_and_one_registry_entry(monkeypatch):
    """The README's "adding a loss": with one entry in LOSSES, the config accepts the loss by name,
    types its options, refuses them for other losses, turns its constructor's check into a config
    error naming the field, and the loss builds and trains."""
    import distributed_cl.config as config_module

    monkeypatch.setitem(LOSSES, "shifted", ShiftedOptions)
    try:
        fresh = importlib.reload(config_module)  # the config composes the registry as it is
        config = fresh.Config.load(None, ["data.name=digits", "loss.name=shifted", "loss.shift=0.5"])
        assert (config.loss.shift, config.loss.temperature) == (0.5, 0.5)
        with pytest.raises(ConfigError, match="loss.shift must be >= 0, got -1"):
            fresh.Config.load(None, ["data.name=digits", "loss.name=shifted", "loss.shift=-1"])
        with pytest.raises(ConfigError, match="loss.shift applies to shifted, not to loss.name=ntxent"):
            fresh.Config.load(None, ["data.name=digits", "loss.shift=1"])
        with pytest.raises(ConfigError, match="loss.name must be one of ntxent, .*contrastive, shifted; got 'x'"):
            fresh.Config.load(None, ["data.name=digits", "loss.name=x"])
        z = torch.randn(8, 4, requires_grad=True)
        loss = config.loss(config.loss.build(), z, z.flip(0), labels=torch.arange(8))
        loss.backward()
        assert loss.item() > 0.5 and z.grad.abs().sum() > 0
    finally:
        monkeypatch.undo()
        importlib.reload(config_module)
