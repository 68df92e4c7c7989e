"""Encoders: image (torchvision ResNet-18, a small CNN) and text (Hugging Face transformers)."""

from distributed_cl.models.image import SmallCNN, build_encoder, load_encoder, projection_head, save_encoder
from distributed_cl.models.text import TextTokenizer, TextTower

__all__ = ["SmallCNN", "TextTokenizer", "TextTower", "build_encoder", "load_encoder", "projection_head", "save_encoder"]
