"""Encoders: image (torchvision ResNet-18, a small CNN) and text (Hugging Face transformers)."""

from distributed_cl.models.image import (
    ENCODERS,
    GridPool,
    SmallCNN,
    build_encoder,
    build_head,
    load_encoder,
    projection_head,
    save_encoder,
)
from distributed_cl.models.text import TextTokenizer, TextTower

__all__ = [
    "ENCODERS", "GridPool", "SmallCNN", "TextTokenizer", "TextTower", "build_encoder", "build_head", "load_encoder", "projection_head",
    "save_encoder",
]
