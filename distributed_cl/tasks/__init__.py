"""Tasks: one module per modality, behind the Task contract (tasks/base.py), each with the config
sections it owns. TASKS is the one registry of them: `task` in a config is checked against it, and
the config is composed of their sections."""

from __future__ import annotations

import torch

from distributed_cl.tasks.base import TOWERS_FILE, CachedBatches, ContrastiveModel, Splits, Task, to_device
from distributed_cl.tasks.image import ImageTask
from distributed_cl.tasks.image_text import ImageTextTask
from distributed_cl.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ImageTask, TextTask, ImageTextTask)}


def load_towers(path: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained towers of any task from `<run_dir>/towers.pt`, in eval mode: no Ray, and none
    of the training machine's files (pretrained weights, model directories) needed. Towers that
    read text carry their tokenizer as `towers.tokenize(texts) -> tokens`:

        towers = load_towers("runs/NAME/towers.pt")
        image_z = towers.embed_images(images)                 # image_text: floats in [0, 1]
        text_z = towers.embed_texts(towers.tokenize(["a cat"]))
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    task = TASKS[saved["task"]]
    config = task.saved_config(saved["config"])
    towers = task.build_towers(config, saved.get("architecture"))  # older files hold none: built from the config
    towers.load_state_dict(saved["state_dict"])
    tokenize = task.saved_tokenizer(config, saved.get("tokenizer"))
    if tokenize is not None:
        towers.tokenize = tokenize
    towers.task_name = task.name  # which Task encodes for them (train.py embed, evaluate, mine)
    towers.saved_config = config
    return towers.eval()


__all__ = ["TASKS", "TOWERS_FILE", "CachedBatches", "ContrastiveModel", "Splits", "Task", "load_towers", "to_device"]
