"""Peak loss memory and step time against the global batch, on 2 gloo ranks x 1 thread, d=128:
our NT-Xent and CLIP plain and chunked (chunk_size), lightly's NT-Xent and open_clip's ClipLoss.

    python experiments/bench_large_batch.py     # writes experiments/results/large_batch/{results.csv,*.png}

The global batch counts samples: NT-Xent's has two views each (2N embeddings, a 2n x 2N block of
logits per rank), CLIP's one image and one text. Memory and time are measured as in
bench_loss.py (peak resident-set growth during one step, max over ranks; median step on rank 0).
Methods whose logits would not fit in this machine's memory are left out of the largest sizes.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # open_clip's all_gather, in every rank

from bench_loss import run  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "large_batch")
# the largest global batch each method runs at here (24 GiB, 2 ranks): plain losses hold their
# (n x N) logits and a same-sized softmax or gradient, peers a few more
LARGEST = {"ours NTXent": 16384, "ours NTXent chunked": 32768, "lightly NTXent": 8192,
           "ours CLIP": 32768, "ours CLIP chunked": 65536, "open_clip CLIP": 16384}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--methods", nargs="+", choices=list(LARGEST), default=list(LARGEST),
                        help="measure these again; the other methods' rows are kept from the last results.csv")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "results.csv")
    rows = []
    if set(args.methods) != set(LARGEST) and os.path.exists(csv_path):
        with open(csv_path) as f:
            rows = [r for r in csv.DictReader(f) if r["method"] not in args.methods]
        for r in rows:
            r["global_batch"], r["step_s"], r["peak_mib"] = int(r["global_batch"]), float(r["step_s"]), float(r["peak_mib"])
    print("| loss | global batch | method | step (s) | peak memory (MiB) |")
    print("|---|---:|---|---:|---:|")
    for method in args.methods:
        for batch in (b for b in args.batches if b <= LARGEST[method]):
            steps = 3 if batch <= 8192 else 1  # a step at 32k-65k takes a minute on one core
            seconds, mib = run(method, batch // 2, args.dim, 2, steps, warmup=1 if batch <= 16384 else 0)
            loss = "NT-Xent" if "NTXent" in method else "CLIP"
            rows.append({"loss": loss, "method": method, "global_batch": batch, "step_s": round(seconds, 4),
                         "peak_mib": round(mib, 1)})
            print(f"| {loss} | {batch:,} | {method} | {seconds:.3f} | {mib:.0f} |", flush=True)
    rows.sort(key=lambda r: (list(LARGEST).index(r["method"]), r["global_batch"]))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, loss in enumerate(("NT-Xent", "CLIP")):
        for method in sorted({r["method"] for r in rows if r["loss"] == loss}):
            mine = [r for r in rows if r["method"] == method]
            x = [r["global_batch"] for r in mine]
            style = "--" if "chunked" in method else "-"
            axes[0][col].plot(x, [r["peak_mib"] for r in mine], style, marker="o", label=method)
            axes[1][col].plot(x, [r["step_s"] for r in mine], style, marker="o", label=method)
        axes[0][col].set_title(f"{loss}: peak loss memory per rank")
        axes[1][col].set_title(f"{loss}: forward + backward")
        axes[0][col].set_ylabel("MiB")
        axes[1][col].set_ylabel("seconds")
        axes[1][col].set_xlabel("global batch (2 gloo ranks, d=128)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory_and_time.png"), dpi=110)


if __name__ == "__main__":
    main()
