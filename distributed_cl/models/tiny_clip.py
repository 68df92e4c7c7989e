"""Write tiny random CLIPs, for checking the pretrained-tower paths offline (no weights can be
downloaded here): the transformers CLIP and SigLIP as model directories, the open_clip one as a
model config JSON and a checkpoint. They check the plumbing, not quality.

    python -m distributed_cl.models.tiny_clip [--out data/tiny_clip]
    bash scripts/train.sh --config experiments/image_text_emoji.yaml \
        --set image_text.towers=hf_clip --set image_text.pretrained=data/tiny_clip/hf_clip
    bash scripts/train.sh --config experiments/image_text_emoji.yaml --set loss.name=siglip \
        --set image_text.towers=hf_clip --set image_text.pretrained=data/tiny_clip/hf_siglip
    bash scripts/train.sh --config experiments/image_text_emoji.yaml --set image_text.towers=open_clip \
        --set image_text.open_clip_config=data/tiny_clip/open_clip/tiny-clip.json \
        --set image_text.pretrained=tiny-clip:data/tiny_clip/open_clip/tiny-clip.pt
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _byte_tokenizer(path: Path) -> dict:
    """A real CLIPTokenizer on a byte-level vocabulary of single characters (no merges), saved at
    `path`; the text config entries that match it."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return {**TOWER, "vocab_size": len(vocab), "max_position_embeddings": 48, "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}


def save_tiny_hf_clip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A transformers CLIPModel (2 layers of width 32 a tower, 8-pixel patches) and its tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    text = _byte_tokenizer(path)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config={**TOWER, "image_size": image_size, "patch_size": 8},
                         projection_dim=16)).save_pretrained(path)
    return path


def save_tiny_hf_siglip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A transformers SiglipModel of the same size (its scale and bias at SigLIP's init), its
    SigLIP image processor (mean and std 0.5) and the byte-level tokenizer."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    text = _byte_tokenizer(path)
    text["projection_size"] = TOWER["hidden_size"]
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config={**TOWER, "image_size": image_size, "patch_size": 8}))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(path)
    return path


def save_tiny_open_clip(directory: Path, name: str = "tiny-clip", image_size: int = 32, seed: int = 0) -> dict:
    """An open_clip model config `<name>.json` (open_clip's BPE tokenizer, context 24) and
    `<name>.pt`, its random weights; {"name", "config", "checkpoint"}."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    checkpoint = directory / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), checkpoint)
    return {"name": name, "config": str(config), "checkpoint": str(checkpoint)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/tiny_clip"))
    args = parser.parse_args()
    print(save_tiny_hf_clip(args.out / "hf_clip"))
    print(save_tiny_hf_siglip(args.out / "hf_siglip"))
    print(save_tiny_open_clip(args.out / "open_clip"))


if __name__ == "__main__":
    main()
