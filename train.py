#!/usr/bin/env python
"""Train a contrastive model with Ray Train, locally or on a cluster.

    python train.py                                            # local: Fashion-MNIST SimCLR, 2 CPU workers
    python train.py --config experiments/image_supcon.yaml --set loss.temperature=0.07
    ray submit cluster/aws.yaml train.py -- --config experiments/image_simclr.yaml --use-gpu
    ray job submit -- python train.py --num-workers 8 --use-gpu
    python train.py sweep --config experiments/image_simclr.yaml --sweep experiments/sweeps/image.yaml

The same --name and --storage-path resume a run (or a sweep) from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

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
    p.add_argument("--verbose", action="store_true", default=None, help="also Ray Train's per-report log lines")
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
    from distributed_cl.tune import SweepError, load_sweep, with_fixed

    args = parse_sweep_args(argv)
    try:  # the config and the sweep are checked before Ray starts
        overrides = args.set + (["train.verbose=true"] if args.verbose else [])
        config = Config.load(find(args.config), overrides)
        spec = load_sweep(find(args.sweep), config)
        config = with_fixed(config, spec, overrides)  # --set wins over the sweep's fixed values
    except (ConfigError, SweepError, FileNotFoundError) as e:
        print(f"{'config' if isinstance(e, ConfigError) else 'sweep'} error: {e}", file=sys.stderr)
        return 2
    from distributed_cl.tune import run_sweep

    name = args.name or os.path.splitext(os.path.basename(args.sweep))[0]
    run_sweep(config, spec, args.storage_path or config.train.storage_path, name, verbose=args.verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
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
