"""Where the image step's time goes: the input pipeline alone, the training step on synthetic
device-resident batches, and the whole train.py step, side by side in one run.

    python experiments/bench_throughput.py                 # CPU: 1 thread per worker; CUDA too when present
    python experiments/bench_throughput.py --steps 60

Rows (samples/s; a sample is one image, i.e. two views):
- pipeline: two views of Fashion-MNIST batches, 1 thread. per_sample = torchvision v2 per image
  through a DataLoader (0 workers, what the loop used before); batched = distributed_cl's
  BatchTwoViews on the whole batch; kornia = kornia.augmentation's equivalent (if installed).
- step: the image model + NT-Xent forward, backward and AdamW step on views already on the
  device (no augmentation), 1 process.
- train.py: the default image run (global batch 256 on CPU, 1,024 on CUDA) through Ray Train,
  median samples/s over its report windows after the first, for each pipeline; and on CPU the
  main job as it was before the batched pipeline (per-sample views, the wider small_cnn).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402
from distributed_cl.data.augment import BatchTwoViews  # noqa: E402
from distributed_cl.data.images import TwoViews, two_view_transform  # noqa: E402
from distributed_cl.samplers import DistributedRandomBatchSampler  # noqa: E402
from distributed_cl.tasks import ContrastiveModel  # noqa: E402
from distributed_cl.tasks.image import ImageTask  # noqa: E402
from distributed_cl.train_loop import train_step  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_simclr.yaml")
# The main job's input pipeline and model before issue 8 (its samples/s is the 2x target's base).
BEFORE = ["data.pipeline=per_sample", "model.width=32", "data.blur=0"]


def rate(fn, batch: int, steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def pipeline_rates(config: Config, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    d = config.data
    data = d.load()
    sampler = DistributedRandomBatchSampler(len(data.train_images), batch, 1, 0)
    loader = torch.utils.data.DataLoader(
        TwoViews(data.train_images, data.train_labels, two_view_transform(28, d.crop_scale_min, d.jitter, d.blur)),
        batch_sampler=sampler)
    batches = iter(loader)
    rates = {"per_sample": rate(lambda: next(batches), batch, steps, torch.device("cpu"))}
    images = data.train_images.to(device)
    views = BatchTwoViews(28, d.crop_scale_min, d.jitter, blur=d.blur)
    index = torch.randperm(len(images))[:batch].to(device)
    rates["batched"] = rate(lambda: views(images[index]), batch, steps, device)
    try:
        import kornia.augmentation as K
    except ImportError:
        return rates
    augment = K.AugmentationSequential(
        K.RandomResizedCrop((28, 28), scale=(d.crop_scale_min, 1.0)), K.RandomHorizontalFlip(),
        *([K.RandomGaussianBlur(2 * math.ceil(2 * d.blur) + 1, (0.1, d.blur), p=0.5)] if d.blur else []),
        K.ColorJitter(brightness=d.jitter, contrast=d.jitter, p=0.8)).to(device)

    def kornia_views():
        x = images[index].unsqueeze(1).float() / 255
        return augment(x), augment(x)

    rates["kornia"] = rate(kornia_views, batch, steps, device)
    return rates


def step_rate(config: Config, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = ContrastiveModel(ImageTask.build_towers(config), config.loss.build(), config.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    synthetic = {"a": torch.rand(batch, 1, 28, 28, device=device), "b": torch.rand(batch, 1, 28, 28, device=device),
                 "labels": torch.zeros(batch, dtype=torch.long, device=device)}

    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    return rate(lambda: train_step(model, model, optimizer, synthetic, autocast), batch, steps, device)


def train_py_rate(name: str, overrides: list[str], workers: int, use_gpu: bool, batch: int, steps: int,
                  storage: str) -> float:
    config = Config.load(CONFIG, overrides + [
        f"train.num_workers={workers}", f"train.use_gpu={str(use_gpu).lower()}",
        f"train.global_batch_size={batch}", f"train.max_steps={steps}", "train.log_every=10",
        f"train.checkpoint_every={steps}", f"train.name=throughput-{name}-{workers}-{use_gpu}",
        f"train.storage_path={storage}", "data.eval_bank_size=1000", "data.eval_test_size=1000",
    ])
    summary = trainer.run(config)
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r["samples_per_s"]]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="train.py steps per row")
    parser.add_argument("--cuda-only", action="store_true", help="skip the CPU rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = Config.load(CONFIG)
    m = config.model
    model = f"{m.encoder} width {m.width} pool {m.pool}"
    rows = []  # (device, what, variant, samples/s)
    cpu = torch.device("cpu")
    if not args.cuda_only:
        for name, value in pipeline_rates(config, 256, 20, cpu).items():
            rows.append(("CPU, 1 thread", "pipeline", name, value))
        rows.append(("CPU, 1 thread", "step (synthetic batches)", f"{model}, batch 256",
                     step_rate(config, 256, 10, cpu)))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        name = torch.cuda.get_device_name()
        for variant, value in pipeline_rates(config, 1024, 50, gpu).items():
            rows.append((name, "pipeline", f"{variant}, batch 1024", value))
        rows.append((name, "step (synthetic batches)", f"{model}, batch 1024", step_rate(config, 1024, 50, gpu)))
    with tempfile.TemporaryDirectory() as storage:
        if not args.cuda_only:  # the main job as it was before the batched pipeline and its recipe
            value = train_py_rate("before", BEFORE, 2, False, 256, args.steps, storage)
            rows.append(("CPU, 2 workers x 1 thread", "train.py", "main job before: " + ", ".join(BEFORE), value))
        for pipeline in ("per_sample", "batched"):
            for workers in () if args.cuda_only else (1, 2):
                value = train_py_rate(pipeline, [f"data.pipeline={pipeline}"], workers, False, 256, args.steps, storage)
                rows.append((f"CPU, {workers} worker(s) x 1 thread", "train.py", pipeline, value))
            if torch.cuda.is_available():
                value = train_py_rate(pipeline, [f"data.pipeline={pipeline}"], 1, True, 1024, args.steps, storage)
                rows.append((f"{name}, 1 worker", "train.py", f"{pipeline}, batch 1024", value))
    print("\n| device | what | variant | samples/s |")
    print("|---|---|---|---:|")
    for device, what, variant, value in rows:
        print(f"| {device} | {what} | {variant} | {value:,.0f} |")


if __name__ == "__main__":
    main()
