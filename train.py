#!/usr/bin/env python
"""Train a contrastive model with Ray Train, locally or on a cluster.

    python train.py                                            # local: Fashion-MNIST SimCLR, 2 CPU workers
    python train.py --config experiments/image_supcon.yaml --set loss.temperature=0.07
    ray submit cluster/aws.yaml train.py -- --config experiments/image_simclr.yaml --use-gpu
    ray job submit -- python train.py --num-workers 8 --use-gpu
    python train.py sweep --config experiments/image_simclr.yaml --sweep experiments/sweeps/image.yaml
    python train.py evaluate --run runs/NAME --beir data/scifact --split test   # nDCG@10, MRR@10, ...
    python train.py embed --run runs/NAME --config C --side b --output embeddings/
    python train.py mine --config C --run runs/NAME --output mined.jsonl --num-negatives 3

The same --name and --storage-path resume a run (or a sweep) from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

from distributed_cl.config import Config, ConfigError

DEFAULT_CONFIG = "experiments/image_simclr.yaml"


def find(path: str) -> str:
    """`path` as given if it exists, else under the repository this script or the installed
    distributed_cl comes from: `ray submit` runs a copy of this script in the head's home directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    package_repo = os.path.dirname(os.path.dirname(inspect.getfile(Config)))
    for repo in (os.path.dirname(os.path.abspath(__file__)), package_repo):
        if os.path.exists(os.path.join(repo, path)):
            return os.path.join(repo, path)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: experiments/image_simclr.yaml)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, bf16 autocast")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps")
    p.add_argument("--epochs", type=int, help="train N epochs (instead of --max-steps)")
    p.add_argument("--storage-path", help="where runs, checkpoints and metrics go (local dir or URI)")
    p.add_argument("--name", help="run name; an existing name resumes from its latest checkpoint")
    p.add_argument("--output-json", help="write final metrics and the checkpoint path here")
    p.add_argument("--verbose", action="store_true", default=None, help="also Ray's start-up notices and Ray Train's log lines")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set loss.temperature=0.2 (repeatable)")
    return p.parse_args(argv)


def overrides_from_flags(args: argparse.Namespace) -> list[str]:
    flags = {"train.num_workers": args.num_workers, "train.use_gpu": args.use_gpu,
             "train.storage_path": args.storage_path, "train.name": args.name, "train.verbose": args.verbose}
    out = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.epochs is not None:  # one of the two stopping rules
        out += [f"train.epochs={args.epochs}", "train.max_steps=null"]
    if args.max_steps is not None:
        out += [f"train.max_steps={args.max_steps}", "train.epochs=null"]
    return out + args.set


def parse_sweep_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py sweep",
        description="A Ray Tune sweep: every trial trains CONFIG with the trial's values (see distributed_cl/tune.py "
                    "for the sweep YAML). Re-running with the same --name and --storage-path resumes it.")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the training config every trial starts from")
    p.add_argument("--sweep", required=True, help="sweep YAML: metric, mode, epochs, scheduler, space, ...")
    p.add_argument("--storage-path", help="where the sweep directory goes (default: the config's train.storage_path)")
    p.add_argument("--name", help="sweep name (default: the sweep file's name)")
    p.add_argument("--verbose", action="store_true", help="also every trial's Ray Train log lines")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    return p.parse_args(argv)


def sweep_main(argv: list[str]) -> int:
    from distributed_cl.trackers import check_trackers
    from distributed_cl.tune import SweepError, load_sweep, with_fixed

    args = parse_sweep_args(argv)
    try:  # the config and the sweep are checked before Ray starts
        overrides = args.set + (["train.verbose=true"] if args.verbose else [])
        config = Config.load(find(args.config), overrides)
        spec = load_sweep(find(args.sweep), config)
        config = with_fixed(config, spec, overrides)  # --set wins over the sweep's fixed values
        check_trackers(config.train.model_copy(update={"storage_path": args.storage_path or config.train.storage_path}))
    except (ConfigError, SweepError, FileNotFoundError) as e:
        print(f"{'config' if isinstance(e, ConfigError) else 'sweep'} error: {e}", file=sys.stderr)
        return 2
    from distributed_cl.tune import run_sweep

    name = args.name or os.path.splitext(os.path.basename(args.sweep))[0]
    run_sweep(config, spec, args.storage_path or config.train.storage_path, name, verbose=args.verbose)
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (refused, naming the flag, before Ray starts)."""
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}")
    return int(text)


def pool_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that embed in a pool of model replicas (Ray Data actors)."""
    p.add_argument("--num-workers", type=positive_int, default=2, help="model replicas (Ray Data actors; default 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--batch-size", type=positive_int, default=256, help="rows a replica embeds at once (default 256)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per replica (default: 1, or what the cluster leaves)")
    p.add_argument("--verbose", action="store_true", help="also Ray Data's progress")


def one_source(config: Config, command: str) -> None:
    """embed and mine read one dataset: section's rows."""
    if config.dataset is None:
        raise ConfigError(f"dataset: {command} reads the config's dataset: rows (set dataset.format and dataset.path)")
    if len(config.datasets) > 1 or config.datasets[0] is not config.dataset:
        raise ConfigError(f"dataset.sources: {command} reads one source; give it a config (or --set dataset...) "
                          "of that source alone")


def rows_and_towers(args: argparse.Namespace, command: str):
    """embed's and mine's config (--config, --set: one dataset: source) and towers (--run, else the config's)."""
    config = Config.load(find(args.config), args.set)
    one_source(config, command)
    return config, towers_source(args, config)


def towers_source(args: argparse.Namespace, config: Config | None):
    from distributed_cl.embedding import TowersSource

    if args.run is not None:
        return TowersSource(run=args.run)
    if config is None:
        raise ConfigError("give --run RUN_DIR (a run's trained towers) or --config C (its untrained towers)")
    return TowersSource(config=config.resolve_paths().to_dict())


def pool_of(args: argparse.Namespace):
    from distributed_cl.embedding import Pool

    return Pool(args.num_workers, args.use_gpu, args.batch_size, args.cpus_per_worker)


def embed_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train.py embed", description="Embed every row of the config's dataset: "
                                "section with a run's towers (or the config's untrained ones), in a pool of replicas; "
                                "parquet files of (id, embedding) under --output.")
    p.add_argument("--run", help="a finished run's directory (its towers.pt)")
    p.add_argument("--config", required=True, help="the config whose dataset: section is embedded")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--side", default="a", choices=("a", "b"), help="which side's column and tower (default a)")
    p.add_argument("--output", required=True, help="a new (or empty) directory, local or a URI")
    p.add_argument("--shard-rows", type=positive_int, default=100_000, help="rows a parquet file (default 100000)")
    p.add_argument("--output-json", help="also write the summary here")
    pool_args(p)
    args = p.parse_args(argv)
    try:
        config, source = rows_and_towers(args, "embed")
        from distributed_cl.embedding import embed
        from distributed_cl.trainer import connect_ray

        connect_ray(verbose=args.verbose)
        summary = embed(source, config.resolve_paths().dataset, args.side, args.output, pool_of(args),
                        args.shard_rows, config.train.seed, args.verbose)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"[distributed_cl] embedded {summary['embedded']} of {summary['rows']} rows ({summary['skipped']} skipped) "
          f"into {len(summary['files'])} files under {args.output}, {summary['rows_per_s']} rows/s")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train.py evaluate", description="A run's towers (or a config's untrained "
                                "ones) on a BEIR-layout directory: nDCG@10, MRR@10, Recall@10/100, MAP@100.")
    p.add_argument("--run", help="a finished run's directory (its towers.pt)")
    p.add_argument("--config", help="without --run: this config's untrained towers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--beir", required=True, help="corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", default="test", help="the qrels file (default test)")
    p.add_argument("--output-json", help="write {metrics, ...} here")
    pool_args(p)
    args = p.parse_args(argv)
    from distributed_cl.data.beir import load_beir

    try:  # the towers, the judgements and the corpus's ids are checked before Ray starts
        config = Config.load(find(args.config), args.set) if args.config else None
        source = towers_source(args, config)
        beir = load_beir(args.beir, args.split, field="--beir")
        from distributed_cl.corpus import beir_table, evaluate_on_beir
        from distributed_cl.trainer import connect_ray

        connect_ray(verbose=args.verbose)
        result = evaluate_on_beir(source, beir, pool_of(args), args.verbose)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(beir_table(result["metrics"], f"{os.path.basename(os.path.normpath(args.beir))} ({args.split})"))
    print(f"{result['queries']} queries, {result['corpus']} documents ({result['skipped_documents']} skipped)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"run": args.run, "beir": args.beir, "split": args.split, **result},
                                                     indent=2))
    return 0


def read_corpus(path: str, column: str) -> list[str]:
    """The texts of a jsonl / csv / parquet file's `column` (--corpus)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise ConfigError(f"--corpus: {path} does not exist")
    extension = path.lower().rsplit(".", 1)[-1]
    readers = {"parquet": pq.read_table, "csv": pacsv.read_csv, "jsonl": pajson.read_json, "json": pajson.read_json}
    if extension not in readers:
        raise ConfigError(f"--corpus: {path} should end in .jsonl, .csv or .parquet")
    table = readers[extension](path)
    if column not in table.column_names:
        raise ConfigError(f"--corpus-column: {column!r} is not a column of {path} (its columns: "
                          f"{', '.join(table.column_names)})")
    return [str(t) for t in table.column(column).to_pylist()]


def mine_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="train.py mine", description="Hard negatives for the (anchor, positive) rows "
                                "of the config's dataset: section, written back with negative_1..negative_N columns.")
    p.add_argument("--config", required=True, help="the config whose dataset: rows are mined")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--run", help="mine with a run's trained towers (default: the config's untrained ones)")
    p.add_argument("--output", required=True, help="FILE.jsonl, FILE.csv or FILE.parquet")
    p.add_argument("--corpus", help="candidates from this file's texts instead of the rows' positives")
    p.add_argument("--corpus-column", default="text", help="the --corpus column (default text)")
    p.add_argument("--num-negatives", type=int, default=3, help="negatives a row (default 3)")
    p.add_argument("--range-min", type=int, default=0, help="skip the top K candidates (default 0)")
    p.add_argument("--range-max", type=int, default=50, help="draw from the top K candidates (default 50)")
    p.add_argument("--relative-margin", type=float,
                   help="drop candidates scoring above the positive's minus X x |the positive's|")
    p.add_argument("--absolute-margin", type=float, help="drop candidates scoring above the positive's minus X")
    p.add_argument("--faiss", action="store_true", help="search with faiss (pip install faiss-cpu)")
    p.add_argument("--output-json", help="also write the summary here")
    pool_args(p)
    args = p.parse_args(argv)
    try:
        config, source = rows_and_towers(args, "mine")
        corpus = read_corpus(args.corpus, args.corpus_column) if args.corpus else None
        from distributed_cl.corpus import mine
        from distributed_cl.retrieval import check_mining
        from distributed_cl.trainer import connect_ray

        check_mining(args.num_negatives, args.range_min, args.range_max, args.relative_margin, args.absolute_margin)
        connect_ray(verbose=args.verbose)
        summary = mine(source, config.resolve_paths().dataset, args.output, pool_of(args), args.num_negatives,
                       args.range_min, args.range_max, args.relative_margin, args.absolute_margin, corpus,
                       args.faiss, config.train.seed, args.verbose)
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"[distributed_cl] mined {summary['written']} of {summary['rows']} rows ({summary['skipped']} skipped, "
          f"{summary['without_enough_negatives']} without {args.num_negatives} negatives) into {args.output}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sweep": sweep_main, "embed": embed_main, "evaluate": evaluate_main, "mine": mine_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = parse_args(argv)
    try:  # every field is checked here, before Ray or any worker starts
        config = Config.load(find(args.config), overrides_from_flags(args))
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from distributed_cl import trainer
    from distributed_cl.data.formats import TooManySkippedRows

    try:
        trainer.run(config, output_json=args.output_json)
    except (ConfigError, TooManySkippedRows) as e:  # found while reading the data, before training
        print(f"{'config' if isinstance(e, ConfigError) else 'data'} error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
