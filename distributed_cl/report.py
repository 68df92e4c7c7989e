"""The run report: one self-contained HTML page (report.html, its plots inline as PNG) a person
opens after a run, or during one (it is rewritten at each evaluation): the curves, the final
table, a map of the held-out embeddings, retrieval examples, the data counts, the hardware and
the config. Written by Ray Train's controller (`ReportWriter`) from what the workers report, so
like callbacks.py it imports no torch; matplotlib only when a page is written. A sweep gets one
too (`write_sweep_report`)."""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from pathlib import Path
from typing import Any

import yaml
from ray.train import UserCallback

REPORT_FILE = "report.html"

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.plots img{width:48%;margin:.5%}.right{background:#d8f5d0}.query{background:#eef3ff;font-weight:600}
.example td{text-align:left;vertical-align:top;max-width:180px;font-size:.85em}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}img.thumb{width:64px;image-rendering:pixelated}"""


def pyplot():
    """matplotlib's pyplot on its file backend (the controller has no display), imported when a page is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, alt: str) -> str:
    """A matplotlib figure as an inline <img>."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def curves(rows: list[dict], names: list[str], final: dict[str, float], baseline_name: str,
           held_out: list[str]) -> list[str]:
    """One plot per figure against the step (loss, lr, temperature, each held-out metric), with
    the untrained and baseline figures as reference lines where the run has ended. A held-out
    metric is read off the evaluations' own reports (every report repeats the latest)."""
    plt = pyplot()
    evaluations = [r for r in rows if r.get("loss") in (None, "")] or rows
    images = []
    for name in names:
        points = [(int(r["step"]), float(r[name])) for r in (evaluations if name in held_out else rows)
                  if r.get(name) not in (None, "", "nan")]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=name)
        for which, style in (("untrained", "--"), (baseline_name, ":")):
            if f"{name}_{which}" in final:
                ax.axhline(final[f"{name}_{which}"], linestyle=style, color="grey", label=which)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=8)
        images.append(png(fig, name))
    return images


def embedding_map(view: dict) -> str:
    """The held-out embeddings in 2-D, coloured by label where there are labels."""
    plt = pyplot()
    points = view["map"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    labels = points.get("label")
    if labels:  # one colour a class, named where the data names them
        names, classes = points.get("label_names") or {}, sorted(set(labels))
        colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for k, label in enumerate(classes):
            mine = [i for i, other in enumerate(labels) if other == label]
            ax.scatter([points["x"][i] for i in mine], [points["y"][i] for i in mine], s=10, alpha=0.8,
                       color=colours(k % colours.N), label=names.get(str(label), str(label)))
        if len(classes) <= 20:
            ax.legend(fontsize=7, loc="best", markerscale=1.5)
    else:
        ax.scatter(points["x"], points["y"], s=10, alpha=0.8)
    ax.set_title(f"{len(points['x'])} held-out embeddings, {points['method']}")
    ax.set_xticks([])
    ax.set_yticks([])
    return png(fig, "held-out embeddings")


def cell(value: dict) -> str:
    """A text, or an image thumbnail (a base64 PNG)."""
    if "png" in value:
        return f'<img class="thumb" src="data:image/png;base64,{value["png"]}">'
    return html.escape(value["text"])


def examples(view: dict) -> str:
    rows = []
    for example in view["examples"]:
        results = "".join(f'<td class="{"right" if r["right"] else ""}">{cell(r)}<br><small>{r["score"]:.3f}'
                          f'{" &#10003;" if r["right"] else ""}</small></td>' for r in example["results"])
        rows.append(f'<tr class="example"><td class="query">{cell(example["query"])}</td>{results}</tr>')
    header = "<tr><th>query</th>" + "".join(f"<th>{i + 1}</th>" for i in range(5)) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table><p>Green: a right result (the query's own pair, or its class).</p>"


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows) + "</table>")


def run_report(name: str, rows: list[dict], metric_names: list[str], loss_keys: list[str], final: dict[str, float],
               view: dict | None, config: dict, baseline_name: str) -> str:
    """The page, from metrics.csv's rows, the final metrics (empty while the run goes on), the
    latest report view and the config."""
    losses = [r for r in rows if r.get("loss")]
    parts = [f"<h1>{html.escape(name)}</h1>"]
    if rows:
        seconds = float(rows[-1]["time"]) - float(rows[0]["time"])
        rates = [float(r["samples_per_s"]) for r in losses if r.get("samples_per_s")]
        status = "finished" if final else "running"
        parts.append(f"<p>{status}: step {rows[-1]['step']}, epoch {rows[-1]['epoch']}, {seconds / 60:.1f} min of "
                     f"reports, {sum(rates) / max(len(rates), 1):.0f} samples/s on average; written "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>")
    if final:
        parts.append("<h2>Final table</h2>")
        parts.append(table(["held-out metric", "trained", "untrained", baseline_name], [
            [m, final.get(f"{m}_trained"), final.get(f"{m}_untrained"), final.get(f"{m}_{baseline_name}")]
            for m in metric_names]))
    parts.append("<h2>Curves</h2>")
    parts.append('<div class="plots">' + "".join(curves(rows, ["loss", "lr", *loss_keys, *metric_names], final,
                                                          baseline_name, metric_names)) + "</div>")
    if view and view.get("map"):
        parts.append("<h2>Held-out embeddings</h2>" + embedding_map(view))
        parts.append(f"<h2>Retrieval examples</h2><p>{len(view['examples'])} held-out queries (seeded) and their "
                     f"top 5 among {view['candidates']} held-out {view['result_side']}.</p>" + examples(view))
    last = rows[-1] if rows else {}
    counts = [[key, last.get(key)] for key in sorted(last) if key in ("stream_rows", "skipped_rows", "dropped_rows",
                                                                      "empty_batches", "start_step")
              or key.startswith("batches_")]
    if counts:
        parts.append("<h2>Data</h2>" + table(["count", "value"], counts))
    if view and view.get("hardware"):
        parts.append(f"<h2>Hardware</h2><p>{html.escape(view['hardware'])}</p>")
    parts.append(f"<h2>Config</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>")
    return page(name, parts)


def page(title: str, parts: list[str]) -> str:
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_text(directory: str, name: str, text: str) -> None:
    """`directory`/`name`: a local path, or a URI (pyarrow's filesystems, as Ray's storage uses)."""
    if "://" not in directory:
        Path(directory, name).write_text(text)
        return
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(directory)
    with filesystem.open_output_stream(f"{path.rstrip('/')}/{name}") as f:
        f.write(text.encode())


class ReportWriter(UserCallback):
    """Runs in Ray Train's controller: report.html in the run directory at every evaluation (the
    reports that carry a view) and at the end. It reads back the run's metrics.csv, which
    ProgressLogger (before it in the callbacks) has written."""

    def __init__(self, run_dir: str, name: str, metric_names: tuple[str, ...], loss_keys: tuple[str, ...],
                 config: dict, baseline_name: str, view_key: str) -> None:
        self.run_dir, self.name, self.config, self.baseline_name = run_dir, name, config, baseline_name
        self.view_key = view_key  # the reports' key for the workers' view of the held-out split
        self.metric_names, self.loss_keys = list(metric_names), list(loss_keys)
        self.view: dict | None = None
        self.rows: list[dict] = []  # this controller's reports (the curves where metrics.csv is not local)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        self.rows.append({"time": time.time(), **{k: v for k, v in m.items() if k != self.view_key}})
        final = "peak_memory_mib" in m
        if m.get(self.view_key):
            self.view = m[self.view_key]
        elif not final:
            return
        rows = self.rows
        csv_path = Path(self.run_dir, "metrics.csv")
        if "://" not in self.run_dir and csv_path.exists():  # every attempt's reports, a resumed run's too
            with csv_path.open() as f:
                rows = list(csv.DictReader(f))
        finals = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k.endswith(
            ("_trained", "_untrained", f"_{self.baseline_name}"))} if final else {}
        write_text(self.run_dir, REPORT_FILE, run_report(self.name, rows, self.metric_names, self.loss_keys, finals,
                                                         self.view, self.config, self.baseline_name))


def write_sweep_report(sweep_dir: Path, name: str, rows: list[dict], columns: list[str], plots: list[Path],
                       best: dict | None) -> Path:
    """report.html beside the sweep's results.csv and plots: the trials' table, the plots, the best config."""
    parts = [f"<h1>Sweep {html.escape(name)}</h1>", "<h2>Trials</h2>",
             table(columns, [[row.get(c) for c in columns] for row in rows])]
    for plot in plots:
        parts.append(f'<h2>{html.escape(plot.stem)}</h2><img alt="{html.escape(plot.stem)}" src="data:image/png;base64,'
                     f'{base64.b64encode(plot.read_bytes()).decode()}">')
    if best is not None:
        parts.append(f"<h2>Best config</h2><pre>{html.escape(yaml.safe_dump(best, sort_keys=False))}</pre>")
    path = sweep_dir / REPORT_FILE
    path.write_text(page(f"sweep {name}", parts))
    return path
