"""Ray Train callbacks. They run in Ray Train's controller, a new process every run, which imports
this module to unpickle them: so it imports no torch and nothing of the training stack (that
would add seconds of CPU to the start of every run), only the data module's exception. What
the loss logs is handed to them by the driver, which knows the loss."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from distributed_cl.data.formats import DATA_ERROR, TooManySkippedRows

# How the console line shows a loss's logged values; any other key shows as itself.
SHORT_NAMES = {"temperature": ("T", ".3f"), "logit_bias": ("bias", ".2f")}


def csv_columns(loss_keys: tuple[str, ...], stats_keys: tuple[str, ...], eval_metrics: tuple[str, ...]) -> tuple[str, ...]:
    """metrics.csv's columns, in a fixed order: the loop's, the loss's (`log_keys`), the loss
    statistics' (`LossStats.log_keys`), the held-out metrics."""
    return ("time", "step", "epoch", "loss", "lr", *loss_keys, "samples_per_s", *stats_keys, "empty_batches",
            "start_step", "skipped_rows", *eval_metrics)


class ProgressLogger(UserCallback):
    """Runs in Ray Train's controller: a console line per report, and metrics.csv in the run
    directory (when the storage path is local; trackers.py has the rest). `loss_keys`: what the
    loss logs (its class's `log_keys`), `stats_keys`: what the trainer logs of its statistics."""

    def __init__(self, run_dir: str | None, total_steps: int | None, eval_metrics: tuple[str, ...],
                 console: bool = True, *, loss_keys: tuple[str, ...], stats_keys: tuple[str, ...]) -> None:
        self.run_dir, self.total_steps, self.eval_metrics, self.console = run_dir, total_steps, eval_metrics, console
        self.loss_keys = tuple(loss_keys)
        self.columns = csv_columns(self.loss_keys, tuple(stats_keys), tuple(eval_metrics))

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]  # rank 0's view; the loss is already the mean over ranks
        if self.console:
            print(self._line(m, checkpoint is not None), flush=True)
        if self.run_dir is None:
            return
        csv_path = Path(self.run_dir, "metrics.csv")
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({"time": round(time.time(), 3), **m})

    def _line(self, m: dict, saved: bool) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {m['step']}{total}", f"epoch {m['epoch']}"]
        if "loss" in m:
            parts += [f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
            for key in (k for k in self.loss_keys if k in m):  # the temperature in use (a margin loss has none)
                name, spec = SHORT_NAMES.get(key, (key, ".4g"))
                parts.append(f"{name} {m[key]:{spec}}")
            parts.append(f"{m['samples_per_s']:.0f} samples/s")
            if m.get("anchors_without_positive"):
                parts.append(f"{m['anchors_without_positive']} anchors without positive")
        parts += [f"{name} {m[name]:.4f}" for name in self.eval_metrics if name in m and m[name] == m[name]]  # not NaN
        if saved:
            parts.append("checkpoint saved")
        return "[distributed_cl] " + " | ".join(parts)


class StopOnDataError(UserCallback):
    """Ends the run when the workers report that their stream has too many undecodable rows. An
    error raised in the controller is not retried, unlike a worker's, which Ray Train would meet
    again on the same rows after every restart; `run` raises it as TooManySkippedRows."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if DATA_ERROR in metrics[0]:
            raise TooManySkippedRows(metrics[0][DATA_ERROR])


class FiguresToTune(UserCallback):
    """A sweep trial's reports to Tune (Ray's TuneReportCallback, made in the controller), less
    the keys in `drop`: the run report's view of the held-out data is not a figure to tune on."""

    def __init__(self, drop: str) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        self.drop, self.tune = drop, TuneReportCallback()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.tune.after_report(run_context, [{k: v for k, v in m.items() if k != self.drop} for m in metrics], checkpoint)
