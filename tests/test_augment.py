"""Batched two-view augmentation: shapes, range, per-sample randomness, determinism, resume."""

import pytest
import torch

from distributed_cl.data.augment import BatchTwoViews
from distributed_cl.data.images import TwoViews, two_view_transform


def images(n=16, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)


def test_views_are_float_images_in_the_unit_range():
    views = BatchTwoViews(20, 0.5, 0.4)
    torch.manual_seed(0)
    a, b = views(images())
    assert a.shape == b.shape == (16, 1, 20, 20) and a.dtype == b.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, b)
    colour = views(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))[0]
    assert colour.shape == (4, 3, 20, 20)


def test_every_sample_gets_its_own_crop():
    same = images(1).expand(8, -1, -1)  # one image eight times: only the random parameters differ
    torch.manual_seed(1)
    a, _ = BatchTwoViews(28, 0.3, 0.0, flip=False)(same)
    assert len({tuple(v.flatten().tolist()) for v in a}) == 8


def test_the_whole_image_without_jitter_is_the_image_or_its_mirror():
    x = images(32)
    torch.manual_seed(2)
    a, _ = BatchTwoViews(28, 1.0, 0.0, ratio=(1.0, 1.0))(x)  # crop = the whole image
    ref = x.unsqueeze(1).float() / 255
    plain = [torch.allclose(v, r, atol=1e-5) for v, r in zip(a, ref)]
    mirrored = [torch.allclose(v, r.flip(-1), atol=1e-5) for v, r in zip(a, ref)]
    assert all(p or m for p, m in zip(plain, mirrored))
    assert 8 <= sum(mirrored) <= 24  # flipped with probability 1/2


def test_a_half_area_crop_magnifies_a_region_of_the_image():
    x = torch.zeros(64, 28, 28, dtype=torch.uint8)
    x[:, :, 14:] = 255  # right half white
    torch.manual_seed(3)
    a, _ = BatchTwoViews(28, 0.25, 0.0, flip=False, ratio=(1.0, 1.0))(x)
    white = a.mean(dim=(1, 2, 3))
    assert white.std() > 0.1 and abs(white.mean().item() - 0.5) < 0.1  # crops land left, right and across


def test_same_seed_same_views_and_restored_rng_resumes_the_stream():
    views, x = BatchTwoViews(28, 0.5, 0.4), images()
    torch.manual_seed(3)
    first = views(x)
    state = torch.get_rng_state()
    second = views(x)
    torch.manual_seed(3)
    assert all(torch.equal(p, q) for p, q in zip(first, views(x)))
    torch.set_rng_state(state)  # what a resumed worker does with its checkpointed RNG
    assert all(torch.equal(p, q) for p, q in zip(second, views(x)))
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_view_statistics_match_torchvision_per_sample_pipeline(blur):
    """Same recipe, same distribution: mean intensity, spread and smoothness of the views agree
    with the torchvision v2 per-sample path within sampling noise."""
    x = images(256, seed=4)
    torch.manual_seed(5)
    batched = torch.cat(BatchTwoViews(28, 0.5, 0.4, blur=blur)(x))
    torch.manual_seed(5)
    per_sample = torch.stack([v for i in range(256) for v in (lambda d: (d["a"], d["b"]))(
        TwoViews(x, torch.zeros(256), two_view_transform(28, 0.5, 0.4, blur))[i])])
    assert batched.mean().item() == pytest.approx(per_sample.mean().item(), abs=0.02)
    assert batched.std().item() == pytest.approx(per_sample.std().item(), rel=0.1)
    roughness = lambda v: (v[..., 1:] - v[..., :-1]).abs().mean().item()  # noqa: E731
    assert roughness(batched) == pytest.approx(roughness(per_sample), rel=0.1)


def test_gaussian_blur_matches_torchvision_per_image_and_sigma_zero_is_identity():
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    from distributed_cl.data.augment import gaussian_blur

    x = torch.rand(4, 3, 20, 20)
    sigma = torch.tensor([0.4, 1.0, 2.0, 0.0])
    out = gaussian_blur(x, sigma, radius=4)
    for i in range(3):
        torch.testing.assert_close(out[i], tv_blur(x[i], kernel_size=9, sigma=sigma[i].item()), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3], x[3], atol=0, rtol=0)


def test_blur_smooths_half_of_the_views():
    x = images(200)
    torch.manual_seed(6)
    sharp, _ = BatchTwoViews(28, 1.0, 0.0, flip=False, ratio=(1.0, 1.0))(x)
    torch.manual_seed(6)
    blurred, _ = BatchTwoViews(28, 1.0, 0.0, flip=False, ratio=(1.0, 1.0), blur=1.5)(x)
    untouched = (blurred == sharp).flatten(1).all(1)
    assert 70 <= untouched.sum() <= 130  # blurred with probability 1/2, each sample on its own
    roughness = lambda v: (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert (roughness(blurred[~untouched]) <= roughness(sharp[~untouched]) + 1e-6).all()  # sigma 0.1: barely
