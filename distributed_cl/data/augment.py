"""Two-view augmentation of a whole batch at once, on the batch's device.

SimCLR's views for grayscale or colour images: random resized crop, horizontal flip,
brightness/contrast jitter and Gaussian blur, each with its own random parameters per sample,
done as one `affine_grid` + `grid_sample`, a few elementwise ops and one grouped convolution
per axis for the batch. The parameters are drawn
from torch's global CPU generator (seeded per rank, saved in checkpoints), so the views are the
same on CPU and GPU and after a resume; only the pixel work runs on the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distributed_cl.data.images import to_float


class BatchTwoViews:
    """`views(images)` -> (view_a, view_b), float in [0, 1], from uint8 images (n, C, H, W) or (n, H, W).

    Args:
        size: output side (the crop is resized to size x size).
        crop_scale_min: the crop covers a random fraction in [crop_scale_min, 1] of the image area,
            with aspect ratio (width / height) log-uniform in `ratio` (torchvision's RandomResizedCrop).
        jitter: brightness and contrast factors in [1 - jitter, 1 + jitter], applied with
            probability `jitter_p` (torchvision's ColorJitter in RandomApply).
        flip: flip horizontally with probability 1/2.
        blur: Gaussian blur with sigma uniform in [0.1, blur] pixels, with probability 1/2
            (SimCLR's; torchvision's GaussianBlur with a (4 * blur + 1)-wide kernel); 0 disables.
    """

    def __init__(self, size: int, crop_scale_min: float, jitter: float, flip: bool = True, jitter_p: float = 0.8,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), blur: float = 0.0) -> None:
        self.size, self.crop_scale_min, self.jitter, self.flip, self.jitter_p = size, crop_scale_min, jitter, flip, jitter_p
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.blur = blur

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = to_float(images)
        return self.view(x), self.view(x)

    def view(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        # every random choice of this view, one row per sample; the copy to a GPU does not wait for it
        u = torch.rand(n, 10).to(x.device, non_blocking=True)
        # Random resized crop as an affine map of the output grid onto the input ([-1, 1] coordinates):
        # width and height fractions from the area fraction and log aspect ratio, centre anywhere it fits.
        area = self.crop_scale_min + (1 - self.crop_scale_min) * u[:, 0]
        log_ratio = self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 1]
        w = (area * log_ratio.exp()).sqrt().clamp(max=1)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1)
        cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(w)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, [n, c, self.size, self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.blur > 0:
            sigma = 0.1 + (self.blur - 0.1) * u[:, 8]
            out = gaussian_blur(out, torch.where(u[:, 9] < 0.5, sigma, 0.0), radius=math.ceil(2 * self.blur))
        if self.jitter == 0:
            return out
        # Brightness, then contrast around each image's mean (torchvision's grayscale mean), with
        # probability jitter_p; factor 1 elsewhere.
        apply = (u[:, 5] < self.jitter_p).float()
        brightness = 1 + apply * self.jitter * (2 * u[:, 6] - 1)
        contrast = 1 + apply * self.jitter * (2 * u[:, 7] - 1)
        out = (out * brightness[:, None, None, None]).clamp_(0, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        return ((out - mean) * contrast[:, None, None, None] + mean).clamp_(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur image i of x (n, C, H, W) with a (2 * radius + 1)-tap Gaussian of std sigma[i] along
    each axis, reflecting at the borders; sigma 0 leaves the image as it is."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3)[:, None]) ** 2)  # sigma 1e-3: exactly [0,..,1,..,0]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * C, taps)
    y = x.reshape(1, n * c, h, w)  # one group per image channel
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)
