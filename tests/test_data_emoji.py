"""The emoji image-caption data: rendering against known emoji, dropping what the font cannot draw,
the seeded split and the render cache."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed_cl.data.emoji as emoji_data
from distributed_cl.data.emoji import EMOJI_FONT, emoji_captions, load_emoji, render_emoji

pytestmark = pytest.mark.skipif(
    not Path(EMOJI_FONT).is_file(), reason=f"{EMOJI_FONT} missing (Debian package fonts-noto-color-emoji)"
)

RED_APPLE, FRANCE = "\U0001f34e", "\U0001f1eb\U0001f1f7"  # U+1F34E; regional indicators F, R
PRIVATE_USE, UNKNOWN_REGION = "\ue000", "\U0001f1fd\U0001f1fd"  # no glyph; regional indicators X, X (no region)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """One full render at 16 px (about 2 s) shared by the read-only tests."""
    cache_dir = tmp_path_factory.mktemp("emoji_cache")
    return cache_dir, load_emoji(image_size=16, cache_dir=cache_dir)


def test_red_apple_is_red_in_the_middle_and_named():
    images, drawn = render_emoji([RED_APPLE], EMOJI_FONT, 32)
    assert drawn == [RED_APPLE] and images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8
    r, g, b = images[0, :, 10:22, 10:22].int()
    assert ((r > 180) & (g < 120) & (b < 120)).float().mean() > 0.8
    assert (images[0, :, 0, 0] == 255).all()  # a corner is background: white
    assert emoji_captions()[RED_APPLE] == "red apple"


def test_flag_of_france_is_blue_left_red_right():
    images, _ = render_emoji([FRANCE], EMOJI_FONT, 32)
    left, right = images[0, :, 8:24, 2:8].float().mean((1, 2)), images[0, :, 8:24, 24:30].float().mean((1, 2))
    assert left[2] > left[0] + 50 and right[0] > right[2] + 50
    assert emoji_captions()[FRANCE] == "flag: France"


def test_what_the_font_cannot_draw_is_dropped():
    chars = [PRIVATE_USE, "A", " ", RED_APPLE, UNKNOWN_REGION, RED_APPLE + RED_APPLE, FRANCE]
    images, drawn = render_emoji(chars, EMOJI_FONT, 8)
    # blank; blank; blank; drawn; the placeholder flag; two glyphs side by side; drawn
    assert drawn == [RED_APPLE, FRANCE] and images.shape == (2, 3, 8, 8)
    assert render_emoji([PRIVATE_USE], EMOJI_FONT, 8)[0].shape == (0, 3, 8, 8)


def test_captions_without_emoji_test_txt_fall_back_to_the_emoji_package(tmp_path):
    captions = emoji_captions(tmp_path / "absent.txt")
    assert captions[RED_APPLE] == "red apple"
    assert captions[FRANCE] == "flag: France"  # the package says ':France:'
    assert captions["\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"] == "flag: Scotland"
    assert captions.keys() == emoji_captions().keys()


def test_selection_excludes_skin_tones_and_components():
    captions = emoji_captions()
    assert 1800 <= len(captions) <= 2100
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for chars in captions for c in chars)
    assert "\U0001f9b0" not in captions  # red hair component
    assert "\U0001f44d" in captions and "\U0001f44d\U0001f3fd" not in captions  # thumbs up, not its tones


def test_load_emoji_shapes_counts_and_split(loaded):
    _, data = loaded
    train, test = data.train, data.test
    n = len(train.captions) + len(test.captions)
    assert 1500 <= n <= 2200
    assert len(test.captions) == 300 and test.images.shape == (300, 3, 16, 16)
    assert train.images.shape == (n - 300, 3, 16, 16) and train.images.dtype == test.images.dtype == torch.uint8
    everything = torch.cat([train.images, test.images])
    assert (everything < 250).flatten(1).any(1).all(), "a blank (all white) image was kept"
    captions = train.captions + test.captions
    assert len(set(captions)) == n, "captions are unique"
    assert not set(train.captions) & set(test.captions)
    assert "red apple" in captions and "flag: France" in captions


def test_split_is_seeded(loaded):
    cache_dir, data = loaded
    # The documented split: numpy's seeded permutation of the kept emoji sorted by emoji string.
    captions = emoji_captions()
    by_caption = {caption: chars for chars, caption in captions.items()}
    kept = sorted(by_caption[c] for c in data.train.captions + data.test.captions)
    order = np.random.default_rng(0).permutation(len(kept))
    assert data.test.captions == [captions[kept[i]] for i in order[:300]]
    again = load_emoji(image_size=16, cache_dir=cache_dir)
    assert again.test.captions == data.test.captions and torch.equal(again.train.images, data.train.images)
    other = load_emoji(image_size=16, cache_dir=cache_dir, seed=1)
    assert set(other.test.captions) != set(data.test.captions)
    assert sorted(other.train.captions + other.test.captions) == sorted(data.train.captions + data.test.captions)
    small = load_emoji(image_size=16, cache_dir=cache_dir, test_size=10, max_train=7)
    full = load_emoji(image_size=16, cache_dir=cache_dir, test_size=10)
    assert small.test.captions == full.test.captions and small.train.captions == full.train.captions[:7]


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    first = load_emoji(image_size=8, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("emoji_8_") and files[0].suffix == ".pt"

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(emoji_data, "render_emoji", no_rendering)
    second = load_emoji(image_size=8, cache_dir=tmp_path)
    assert second.test.captions == first.test.captions and torch.equal(second.train.images, first.train.images)
    with pytest.raises(AssertionError, match="rendered again"):
        load_emoji(image_size=9, cache_dir=tmp_path)  # another size is another cache entry


@pytest.mark.parametrize("test_size", [0, -1, 5000])
def test_bad_test_size_is_refused(loaded, test_size):
    with pytest.raises(ValueError, match=f"test_size.*{test_size}"):
        load_emoji(image_size=16, cache_dir=loaded[0], test_size=test_size)


def test_missing_font_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        load_emoji(font=tmp_path / "NotoColorEmoji.ttf", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        render_emoji([RED_APPLE], tmp_path / "NotoColorEmoji.ttf")


def test_missing_emoji_package_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "emoji", None)  # makes `import emoji` raise ImportError
    with pytest.raises(ImportError, match="pip install emoji"):
        emoji_captions()


def test_without_libraqm_zwj_sequences_are_dropped_with_a_warning(monkeypatch):
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f466"  # man ZWJ woman ZWJ boy: one glyph only with raqm layout
    if not emoji_data.features.check("raqm"):
        pytest.skip("this Pillow has no libraqm: the sequence cannot be drawn here at all")
    images, drawn = render_emoji([family, "\U0001f34e"], image_size=8)
    assert drawn == [family, "\U0001f34e"]
    monkeypatch.setattr(emoji_data.ImageFont.core, "HAVE_RAQM", False)  # basic layout, as without libraqm
    monkeypatch.setattr(emoji_data.features, "check", lambda name: False if name == "raqm" else True)
    with pytest.warns(RuntimeWarning, match="no libraqm"):
        images, drawn = render_emoji([family, "\U0001f34e"], image_size=8)
    assert drawn == ["\U0001f34e"]
