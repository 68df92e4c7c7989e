"""Tasks: one module per modality, behind the Task contract (tasks/base.py). TASKS is the one
registry of them: `task` in a config is checked against it."""

from __future__ import annotations

import torch

from distributed_cl.tasks.base import TOWERS_FILE, CachedBatches, ContrastiveModel, Splits, Task, to_device
from distributed_cl.tasks.image import ImageTask
from distributed_cl.tasks.image_text import ImageTextTask
from distributed_cl.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ImageTask, TextTask, ImageTextTask)}


def load_towers(path: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained towers of any task from `<run_dir>/towers.pt` (no Ray needed), in eval mode."""
    from distributed_cl.config import Config

    saved = torch.load(path, map_location=map_location, weights_only=True)
    towers = TASKS[saved["task"]].build_towers(Config.from_dict(saved["config"]))
    towers.load_state_dict(saved["state_dict"])
    return towers.eval()


__all__ = ["TASKS", "TOWERS_FILE", "CachedBatches", "ContrastiveModel", "Splits", "Task", "load_towers", "to_device"]
