"""Emoji image-caption pairs for CLIP-style training, made offline from two Debian/PyPI sources:
images are emoji drawn with Pillow from Google's Noto Color Emoji font (Debian's fonts-noto-color-emoji),
captions are their CLDR English names ("red apple", "flag: France") from Unicode's emoji-test.txt
(Debian's unicode-data) where it lists the emoji, else from the `emoji` package.

Which emoji: the `emoji` package's fully-qualified ones (this excludes components such as hair and
skin-tone swatches) without skin-tone variants: 1,923 with emoji 2.16.0. Of those, the ones the font
cannot draw are dropped (see `render_emoji`), and the rest is split into train and test by a seeded permutation.
Rendering takes a few seconds, so the images and captions are cached in `cache_dir`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"

_BITMAP_SIZE = 109  # Noto Color Emoji holds 136x128 bitmaps made for this size; FreeType refuses others
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)  # subdivision flags: black flag + tag letters, e.g. England
_UNKNOWN_FLAG = "\U0001f1ff\U0001f1ff"  # "ZZ": no region, so the font draws its placeholder flag
_CACHE_FORMAT = 1  # bump when the rendering changes, to invalidate old caches


@dataclass
class ImageCaptions:
    images: torch.Tensor  # uint8 (n, 3, size, size), RGB on a white background
    captions: list[str]  # CLDR names, e.g. "grinning face", "red apple", "flag: France"


@dataclass
class EmojiData:
    train: ImageCaptions
    test: ImageCaptions


def load_emoji(
    font: str | os.PathLike = EMOJI_FONT,
    image_size: int = 32,
    test_size: int = 300,
    seed: int = 0,
    cache_dir: str | os.PathLike = "~/.cache/distributed_cl",
    max_train: int | None = None,
) -> EmojiData:
    """The emoji the font draws, split at random (seeded) into `test_size` test pairs and the rest for training;
    `max_train` keeps only the first that many training pairs (tiny runs)."""
    font_path = _check_font(font)
    if test_size < 1:
        raise ValueError(f"test_size must be at least 1, got {test_size}")
    if max_train is not None and max_train < 1:
        raise ValueError(f"max_train must be at least 1 (or None for all), got {max_train}")
    images, captions = _rendered(font_path, image_size, Path(cache_dir).expanduser())
    if test_size >= len(captions):
        raise ValueError(f"test_size={test_size} leaves no training data: only {len(captions)} emoji are drawable")
    order = np.random.default_rng(seed).permutation(len(captions))
    test, train = order[:test_size], order[test_size:][:max_train]
    return EmojiData(
        train=ImageCaptions(images[torch.from_numpy(train)], [captions[i] for i in train]),
        test=ImageCaptions(images[torch.from_numpy(test)], [captions[i] for i in test]),
    )


def emoji_captions(emoji_test: str | os.PathLike | None = EMOJI_TEST) -> dict[str, str]:
    """Emoji string -> caption, for the fully-qualified emoji of the `emoji` package minus skin-tone variants.

    Captions are emoji-test.txt's names where it lists the emoji: they are CLDR's own ("flag: France",
    "keycap: #", "family: man, woman, boy", "Japanese “bargain” button"), whereas the package squeezes them into
    :shortcodes: that drop punctuation and, for flags, the "flag:" prefix (':France:'). Emoji newer than the file
    (Debian 12's is Emoji 15.0), or all of them when the file is absent, get the package's name with underscores
    as spaces and "flag: " put back, so that flags read alike whichever source named them.
    """
    try:
        import emoji
    except ImportError as e:
        raise ImportError("emoji captions need the `emoji` package (pip install emoji)") from e
    cldr = _emoji_test_names(emoji_test)
    captions = {}
    for chars, data in emoji.EMOJI_DATA.items():
        # Components (hair, skin-tone swatches) have their own status, so this also drops them. Skin-tone
        # variants are those with a skin-tone modifier: the same 2,040 as those with "skin_tone" in the name.
        if data["status"] != emoji.STATUS["fully_qualified"] or any(ord(c) in _SKIN_TONES for c in chars):
            continue
        captions[chars] = cldr.get(chars) or _package_caption(chars, data["en"])
    return captions


def _emoji_test_names(path: str | os.PathLike | None) -> dict[str, str]:
    """Fully-qualified lines of emoji-test.txt, e.g. '1F34E ; fully-qualified # 🍎 E0.6 red apple'."""
    if path is None or not Path(path).is_file():
        return {}
    names = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        fields, _, comment = line.partition("#")
        codepoints, _, status = fields.partition(";")
        if status.strip() != "fully-qualified":
            continue
        chars = "".join(chr(int(c, 16)) for c in codepoints.split())
        names[chars] = comment.split(maxsplit=2)[2]  # after the emoji and its version
    return names


def _package_caption(chars: str, shortcode: str) -> str:
    name = shortcode.strip(":").replace("_", " ")
    is_flag = all(ord(c) in _REGIONAL_INDICATORS for c in chars) or any(ord(c) in _TAGS for c in chars)
    return f"flag: {name}" if is_flag else name


def render_emoji(
    chars: Sequence[str], font: str | os.PathLike = EMOJI_FONT, image_size: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """Draw each string as one image: (uint8 (n, 3, image_size, image_size) RGB on white, the n strings drawn).

    A string is dropped when the font cannot draw it as one emoji: it draws nothing (an unsupported codepoint
    renders as the font's empty .notdef glyph), several glyphs side by side (an unsupported ZWJ sequence falls
    apart into its components; its layout box is then about twice as wide as tall, whereas one emoji's is
    136x128: the ink box would not do, ➖ is 3.5 times as wide as tall), or the font's placeholder flag
    (a flag for a region it does not know). With Debian 12's font (2.042, Emoji 15.1) and emoji 2.16.0 this
    drops 25 of 1,923: 23 blank (Emoji 16-18 singletons such as harp and orca), 1 in pieces (ballet dancer,
    Emoji 17) and 1 placeholder flag (Sark, Emoji 16).
    """
    if not features.check("raqm"):
        warnings.warn("Pillow has no libraqm text layout: ZWJ sequences (families, people with professions, "
                      "some flags) fall apart into several glyphs and are dropped, so fewer emoji are drawn; "
                      "PyPI's Pillow wheels include it", RuntimeWarning, stacklevel=2)
    face = ImageFont.truetype(str(_check_font(font)), _BITMAP_SIZE)
    unknown_flag = _draw(_UNKNOWN_FLAG, face).tobytes()
    images, drawn = [], []
    for text in chars:
        canvas = _draw(text, face)
        box = canvas.getbbox()  # of the non-transparent pixels
        if box is None or canvas.width > 1.5 * canvas.height or canvas.tobytes() == unknown_flag:
            continue
        images.append(np.asarray(_to_square_rgb(canvas.crop(box), image_size)))
        drawn.append(text)
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), drawn
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), drawn


def _draw(text: str, face: ImageFont.FreeTypeFont) -> Image.Image:
    """`text` on a transparent canvas the size of its layout box."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGBA", (1, 1))).textbbox(
        (0, 0), text, font=face, embedded_color=True
    )
    canvas = Image.new("RGBA", (max(right, 1), max(bottom, 1)), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=face, embedded_color=True)
    return canvas


def _to_square_rgb(glyph: Image.Image, size: int) -> Image.Image:
    """Centre on a transparent square (keeps the aspect ratio), shrink, and put on white."""
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # BOX averages areas: antialiased like LANCZOS but without its ringing halo around the dark outlines.
    # Pillow resizes RGBA with premultiplied alpha, so transparent pixels' colour does not bleed in.
    small = square.resize((size, size), Image.Resampling.BOX)
    return Image.alpha_composite(Image.new("RGBA", small.size, (255, 255, 255, 255)), small).convert("RGB")


def _check_font(font: str | os.PathLike) -> Path:
    path = Path(font).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Noto Color Emoji font not found at {path}: install Debian's fonts-noto-color-emoji "
            "(apt-get install fonts-noto-color-emoji) or point image_text.font at NotoColorEmoji.ttf"
        )
    return path


def _rendered(font: Path, image_size: int, cache_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """All drawable emoji, sorted by emoji string (the split's fixed base order), with captions; cached."""
    captions = emoji_captions()
    stat = font.stat()
    # The caption map stands for the emoji package's version and emoji-test.txt; the font's size and
    # mtime for the font; Pillow's layout engine decides which sequences can be drawn.
    key = hashlib.sha256(
        repr((_CACHE_FORMAT, stat.st_size, stat.st_mtime_ns, image_size, features.check("raqm"),
              sorted(captions.items()))).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"emoji_{image_size}_{key}.pt"
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
        return cached["images"], cached["captions"]
    images, drawn = render_emoji(sorted(captions), font, image_size)
    drawn_captions = [captions[c] for c in drawn]
    # Atomic: several training workers may render at once; each replaces the file with the same content.
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=cache.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"images": images, "captions": drawn_captions}, f)
        os.replace(tmp, cache)
    except BaseException:
        os.unlink(tmp)
        raise
    return images, drawn_captions
