"""Encoders: image (a small CNN and ResNet-18 for 28x28 inputs, any torchvision classification
model), text (Hugging Face transformers), and pretrained CLIP towers (models/clip.py)."""

from distributed_cl.models.image import (
    ENCODERS,
    GridPool,
    SmallCNN,
    TorchvisionEncoder,
    build_encoder,
    build_head,
    load_encoder,
    projection_head,
    save_encoder,
)
from distributed_cl.models.text import TextTokenizer, TextTower, save_sentence_transformer

__all__ = [
    "ENCODERS", "GridPool", "SmallCNN", "TextTokenizer", "TextTower", "TorchvisionEncoder", "build_encoder",
    "build_head", "load_encoder", "projection_head", "save_encoder", "save_sentence_transformer",
]
