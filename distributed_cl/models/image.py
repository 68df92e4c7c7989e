"""Image encoders and projection heads, and the exported-encoder file format."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from distributed_cl.options import Options, field_error


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Sequential):
    """Five 3x3 conv blocks (28x28 -> 7x7). Its features are the whole final map, flattened
    (4 * width * 7 * 7 for 28x28 inputs): where a garment has its sleeves, collar or heel is what
    tells many classes apart, and kNN on the full map beats any pooled grid (see the README).
    The projection head pools the map first (`GridPool`)."""

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        w = width
        super().__init__(
            _conv_block(in_channels, w, 2),
            _conv_block(w, 2 * w, 2),
            _conv_block(2 * w, 2 * w, 1),
            _conv_block(2 * w, 4 * w, 1),
            _conv_block(4 * w, 4 * w, 1),
            nn.Flatten(),
        )
        self.channels = 4 * w


class GridPool(nn.Module):
    """Flattened square feature maps (n, C * s * s) -> average-pooled to a pool x pool grid,
    flattened (n, C * pool * pool)."""

    def __init__(self, channels: int, pool: int) -> None:
        super().__init__()
        self.channels, self.pool = channels, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1] // self.channels)
        return F.adaptive_avg_pool2d(x.unflatten(1, (self.channels, side, side)), self.pool).flatten(1)


# torchvision is imported where a torchvision model is built: importing it (and the torch._dynamo
# it pulls in) costs every Ray Train worker seconds of CPU, which the small CNN and the text towers
# do not need.


def resnet18_small(in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 for 28x28 inputs: 3x3 stride-1 stem, no max-pool, no classifier."""
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.out_dim = 512
    return model


# `model.encoder` names one of these (the small-input encoders of the built-in data), or any
# torchvision classification model: (config, in_channels) -> encoder with an `out_dim`
ENCODERS: dict[str, Callable[[ImageEncoderOptions, int], nn.Module]] = {
    "small_cnn": lambda config, in_channels: SmallCNN(in_channels, config.width),
    "resnet18_small": lambda config, in_channels: resnet18_small(in_channels),
}


class ImageEncoderOptions(Options):
    """An image encoder and its projection head (the image task's `model` section; image_text's
    `image_tower`)."""

    # small_cnn | resnet18_small (28x28 stems, for the built-in data: ENCODERS), or any torchvision
    # classification model (resnet50, convnext_tiny, vit_b_16, ...) without its classifier
    encoder: str = "small_cnn"
    weights: str | None = None  # torchvision only: a weights enum member (IMAGENET1K_V2, DEFAULT); null: random
    download: bool = False  # fetch `weights` from download.pytorch.org when the torch hub cache lacks them
    lr_mult: float = Field(1.0, gt=0)  # the encoder's learning rate relative to optim.lr (the head's stays 1)
    width: PositiveInt = 32  # small_cnn channels of the first block
    pool: PositiveInt = 3  # small_cnn: its feature map is pooled to pool x pool for the projection head
    projection_hidden: PositiveInt = 256
    projection_dim: PositiveInt = 128

    @field_validator("encoder")
    @classmethod
    def _known(cls, encoder: str) -> str:
        if encoder not in ENCODERS and encoder not in torchvision_encoders():
            raise ValueError(f"must be one of {', '.join(ENCODERS)} or a torchvision classification model "
                             f"(torchvision.models.list_models()); got {encoder!r}")
        return encoder

    @model_validator(mode="after")
    def _weights_exist(self) -> ImageEncoderOptions:
        if self.weights is not None and self.encoder in ENCODERS:
            raise field_error("weights", f"{self.encoder} has no pretrained weights (torchvision models do)")
        if self.weights is not None:
            try:
                torchvision_weights(self.encoder, self.weights)
            except ValueError as e:
                raise field_error("weights", str(e)) from None
        return self

    def check(self, where: str) -> None:
        """Before Ray starts: pretrained weights must be in the torch hub cache, or allowed to download."""
        if self.weights is None or self.download:
            return
        weights = torchvision_weights(self.encoder, self.weights)
        if not cached_weights_file(weights).is_file():
            raise FileNotFoundError(
                f"{where}.weights: {self.encoder}'s {self.weights} weights are not in the torch hub cache "
                f"({cached_weights_file(weights)}); set {where}.download=true to fetch them from {weights.url}, or "
                "put the file there (TORCH_HOME moves the cache)")


@functools.cache
def torchvision_encoders() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def torchvision_weights(name: str, weights: str):
    """The torchvision weights enum member `weights` (e.g. IMAGENET1K_V2, or DEFAULT) of model `name`."""
    from torchvision.models import get_model_weights

    members = get_model_weights(name).__members__
    if weights not in members:
        raise ValueError(f"{name} has no weights {weights!r} (known: {', '.join(members)})")
    return members[weights]


def cached_weights_file(weights) -> Path:
    """Where torch.hub keeps the file of torchvision `weights` (under $TORCH_HOME, ~/.cache/torch by default)."""
    return Path(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def load_torchvision_weights(name: str, weights: str, download: bool) -> dict:
    """The state dict of `weights`: read from the torch hub cache, or fetched (with a console line)
    only when `download` allows it; never silently."""
    member = torchvision_weights(name, weights)
    path = cached_weights_file(member)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"model.weights: {name}'s {weights} weights are not in the torch hub cache ({path}); set "
                f"model.download=true to fetch them from {member.url}, or put the file there (TORCH_HOME moves the cache)")
        sys.stderr.write(f"[distributed_cl] downloading {name} {weights} weights from {member.url} to {path}\n")
    return torch.hub.load_state_dict_from_url(member.url, progress=False, check_hash=True, map_location="cpu")


def _smallest_input(model: nn.Module, in_channels: int) -> int:
    """The smallest square input among 32, 64, ... that the model's downsampling survives
    (most take 32; inception_v3 needs 75)."""
    was_training = model.training
    model.eval()
    try:
        for size in (32, 64, 96, 128, 160, 224):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_channels, size, size))
                return size
            except RuntimeError:
                continue
        raise ValueError("the model takes no input up to 224 pixels")
    finally:
        model.train(was_training)


class TorchvisionEncoder(nn.Module):
    """A torchvision classification model without its classifier: `encoder(images)` -> (n, out_dim)
    features of float images in [0, 1], of any size and channel count. With `weights`, the inputs
    are normalised as the weights were trained (their mean and std); a first convolution for other
    than 3 channels starts from the RGB one's weights (summed for grayscale); models of a fixed
    input size (ViT) see the images resized to it, and images smaller than the model's
    downsampling allows (32 pixels for most) are upsampled to that size."""

    def __init__(self, name: str, in_channels: int = 3, weights: str | None = None, download: bool = False,
                 load_weights: bool = True) -> None:
        import torchvision

        super().__init__()
        model = torchvision.models.get_model(name, weights=None)
        if weights and load_weights:
            model.load_state_dict(load_torchvision_weights(name, weights, download))
        for aux in ("AuxLogits", "aux1", "aux2"):  # inception_v3's and googlenet's auxiliary classifiers
            if hasattr(model, aux):
                setattr(model, aux, None)
        if hasattr(model, "aux_logits"):
            model.aux_logits = False
        self.out_dim = _drop_classifier(model, name)
        _adapt_first_conv(model, in_channels)
        self.model, self.image_size = model, getattr(model, "image_size", None)
        self.min_size = self.image_size or _smallest_input(model, in_channels)
        mean, std = (0.0,) * in_channels, (1.0,) * in_channels
        if weights:
            preset = torchvision_weights(name, weights).transforms()
            mean, std = _per_channel(preset.mean, in_channels), _per_channel(preset.std, in_channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        size = self.image_size or (self.min_size if min(images.shape[-2:]) < self.min_size else None)
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.model((images - self.mean) / self.std).flatten(1)


def _drop_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's last linear layer (its classifier) by the identity; its input width."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model.encoder: {name}'s classifier is not a linear layer; choose another model")
    path, linear = linears[-1]
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return linear.in_features


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    path, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    with torch.no_grad():
        rgb = conv.weight
        new.weight.copy_(rgb.sum(1, keepdim=True) if in_channels == 1 else
                         rgb.repeat(1, -(-in_channels // 3), 1, 1)[:, :in_channels] * 3 / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _per_channel(values, channels: int) -> tuple[float, ...]:
    return tuple(values) if channels == len(values) else (sum(values) / len(values),) * channels


def build_encoder(config: ImageEncoderOptions, in_channels: int = 1, load_weights: bool = True) -> nn.Module:
    """The encoder `config.encoder` names. `load_weights=False` skips reading pretrained weights
    (a saved state dict replaces them: export loading)."""
    if config.encoder in ENCODERS:
        return ENCODERS[config.encoder](config, in_channels)
    if config.encoder in torchvision_encoders():
        return TorchvisionEncoder(config.encoder, in_channels, config.weights, config.download, load_weights)
    raise ValueError(f"model.encoder: unknown encoder {config.encoder!r} (known: {', '.join(ENCODERS)} and "
                     "torchvision's classification models)")


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SimCLR's MLP head; the loss sees its output, evaluation uses the encoder's."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def build_head(encoder: nn.Module, config: ImageEncoderOptions) -> nn.Sequential:
    """The projection head for `encoder`: small_cnn's feature map is pooled to a
    `config.pool` x `config.pool` grid first, so the contrastive loss sees features that a small
    shift of the crop barely moves, while the map keeps its full layout for evaluation."""
    if isinstance(encoder, SmallCNN):
        mlp = projection_head(encoder.channels * config.pool**2, config.projection_hidden, config.projection_dim)
        return nn.Sequential(GridPool(encoder.channels, config.pool), *mlp)
    return projection_head(encoder.out_dim, config.projection_hidden, config.projection_dim)


def save_encoder(encoder: nn.Module, config: ImageEncoderOptions, in_channels: int, path: str | Path) -> None:
    torch.save({"model_config": config.model_dump(), "in_channels": in_channels, "state_dict": encoder.state_dict()}, path)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load an encoder exported by a training run (no Ray needed), in eval mode:

        encoder = load_encoder("runs/NAME/encoder.pt")
        features = encoder(images)      # images: (n, C, H, W) floats in [0, 1]
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    encoder = build_encoder(ImageEncoderOptions(**saved["model_config"]), saved["in_channels"], load_weights=False)
    encoder.load_state_dict(saved["state_dict"])
    return encoder.eval()
