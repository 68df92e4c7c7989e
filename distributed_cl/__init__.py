"""distributed_cl: large-batch contrastive learning on Ray with exact distributed gradients."""

__version__ = "0.1.0"
