"""Score a text run's export as sentence-transformers loads it, on the run's held-out pairs, beside
the figures the run reported: anchor -> positive recall@1 and @10 from
`SentenceTransformer(<run_dir>/sentence_transformer).encode`, no part of this project in the path.

    bash scripts/train.sh --config experiments/text_wordnet.yaml --output-json runs/text.json
    python experiments/score_sentence_transformer.py runs/text.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", type=Path, help="the run's --output-json file")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    from distributed_cl.config import Config
    from distributed_cl.evaluate import recall_at_k
    from distributed_cl.tasks import TASKS

    summary = json.loads(args.summary.read_text())
    run_dir = Path(summary["run_dir"])
    config = Config.from_dict(torch.load(run_dir / "towers.pt", weights_only=True)["config"])
    test = TASKS["text"](config).data.test  # the run's own held-out split (same config, same seed)
    model = SentenceTransformer(str(run_dir / "sentence_transformer"), device="cpu")
    recall = recall_at_k(model.encode(test.a, convert_to_tensor=True), model.encode(test.b, convert_to_tensor=True),
                         (1, 10))
    print(f"{'held-out pairs: ' + str(len(test)):<28}{'run reported':>14}{'sentence-transformers':>24}")
    for k in (1, 10):
        print(f"{f'recall@{k}':<28}{summary['metrics'][f'recall@{k}_trained']:>14.4f}{recall[k]:>24.4f}")


if __name__ == "__main__":
    main()
