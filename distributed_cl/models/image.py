"""Image encoders and projection heads, and the exported-encoder file format."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from distributed_cl.config import ModelConfig


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


def resnet18_small(in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 for 28x28 inputs: 3x3 stride-1 stem, no max-pool, no classifier."""
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.out_dim = 512
    return model


# `model.encoder` names one of these: (config, in_channels) -> encoder with an `out_dim`
ENCODERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "small_cnn": lambda config, in_channels: SmallCNN(in_channels, config.width),
    "resnet18": lambda config, in_channels: resnet18_small(in_channels),
}


def build_encoder(config: ModelConfig, in_channels: int = 1) -> nn.Module:
    if config.encoder not in ENCODERS:
        raise ValueError(f"model.encoder: unknown encoder {config.encoder!r} (known: {', '.join(ENCODERS)})")
    return ENCODERS[config.encoder](config, in_channels)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SimCLR's MLP head; the loss sees its output, evaluation uses the encoder's."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def build_head(encoder: nn.Module, config: ModelConfig) -> nn.Sequential:
    """The projection head for `encoder`: small_cnn's feature map is pooled to a
    `config.pool` x `config.pool` grid first, so the contrastive loss sees features that a small
    shift of the crop barely moves, while the map keeps its full layout for evaluation."""
    if isinstance(encoder, SmallCNN):
        mlp = projection_head(encoder.channels * config.pool**2, config.projection_hidden, config.projection_dim)
        return nn.Sequential(GridPool(encoder.channels, config.pool), *mlp)
    return projection_head(encoder.out_dim, config.projection_hidden, config.projection_dim)


def save_encoder(encoder: nn.Module, config: ModelConfig, in_channels: int, path: str | Path) -> None:
    torch.save({"model_config": asdict(config), "in_channels": in_channels, "state_dict": encoder.state_dict()}, path)


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load an encoder exported by a training run (no Ray needed), in eval mode:

        encoder = load_encoder("runs/NAME/encoder.pt")
        features = encoder(images)      # images: (n, 1, 28, 28) floats in [0, 1]
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    encoder = build_encoder(ModelConfig(**saved["model_config"]), saved["in_channels"])
    encoder.load_state_dict(saved["state_dict"])
    return encoder.eval()
