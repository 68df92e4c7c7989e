"""Datasets and two-view augmentations."""

from distributed_cl.data.images import ImageData, TwoViews, load_images, two_view_transform

__all__ = ["ImageData", "TwoViews", "load_images", "two_view_transform"]
