"""Two-view augmentation of a whole batch at once, on the batch's device.

SimCLR's views for grayscale or colour images: random resized crop, horizontal flip, and
brightness/contrast jitter, each with its own random parameters per sample, done as one
`affine_grid` + `grid_sample` and a few elementwise ops for the batch. The parameters are drawn
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
    """

    def __init__(self, size: int, crop_scale_min: float, jitter: float, flip: bool = True, jitter_p: float = 0.8,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.crop_scale_min, self.jitter, self.flip, self.jitter_p = size, crop_scale_min, jitter, flip, jitter_p
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = to_float(images)
        return self.view(x), self.view(x)

    def view(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        u = torch.rand(n, 8).to(x.device)  # every random choice of this view, one row per sample
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
