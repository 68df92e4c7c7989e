"""LoRA against full fine-tuning of all-MiniLM-L6-v2 on the WordNet pairs, side by side in one run:
trainable parameters, peak memory per worker, time per step and held-out recall@1 and @10.

    python experiments/lora_vs_full.py                    # 150 steps each (experiments/text_wordnet.yaml)
    python experiments/lora_vs_full.py --steps 60

Both runs are experiments/text_wordnet.yaml through train.py's trainer (2 CPU workers, global
batch 64, InfoNCE at 0.05), at their own usual learning rates: the full model at the config's
5e-5, the adapters (r=16, alpha=32 on query, key and value) at 1e-3.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_cl import trainer  # noqa: E402
from distributed_cl.config import Config  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_wordnet.yaml")
RUNS = {
    "full fine-tuning": [],
    "LoRA r=16": ["text.tower.lora={r: 16, alpha: 32, dropout: 0.05, target_modules: [query, key, value]}",
                  "optim.lr=1e-3"],
}


def trainable_parameters(config: Config) -> int:
    from distributed_cl.tasks import TASKS

    towers = TASKS[config.task].build_towers(config)
    return sum(p.numel() for p in towers.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for name, overrides in RUNS.items():
            config = Config.load(CONFIG, [*overrides, f"train.max_steps={args.steps}", f"train.storage_path={storage}",
                                          f"train.name={name.split()[0].lower()}", "train.loggers=[]"])
            summary = trainer.run(config, console=False)
            m = summary["metrics"]
            with open(os.path.join(summary["run_dir"], "metrics.csv")) as f:
                rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r.get("samples_per_s")]
            seconds = config.train.global_batch_size / statistics.median(rates[1:] or rates)
            rows.append((name, trainable_parameters(config), m["peak_memory_mib"] / 1024, seconds,
                         m["recall@1_trained"], m["recall@10_trained"], m["recall@1_untrained"]))
    print(f"all-MiniLM-L6-v2 on WordNet, {args.steps} steps of 64 pairs, 2 CPU workers")
    print(f"{'run':<20}{'trainable':>12}{'peak GiB/worker':>17}{'s/step':>8}{'recall@1':>10}{'recall@10':>11}"
          f"{'untrained r@1':>15}")
    for name, params, memory, seconds, r1, r10, untrained in rows:
        print(f"{name:<20}{params / 1e6:>11.2f}M{memory:>17.2f}{seconds:>8.2f}{r1:>10.4f}{r10:>11.4f}{untrained:>15.4f}")


if __name__ == "__main__":
    main()
