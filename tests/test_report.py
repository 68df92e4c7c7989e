"""The run report: the workers' view of the held-out split against the same search done here, and
the page rendered by a real headless browser (Debian's chromium). (report.html of a real run and
of a sweep: test_train_cli.py, test_sweep.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distributed_cl.config import Config
from distributed_cl.report import run_report, write_sweep_report
from distributed_cl.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def expected_top5(za: torch.Tensor, zb: torch.Tensor, q: int, self_search: bool) -> list[int]:
    scores = F.normalize(zb, dim=-1) @ F.normalize(za[q], dim=-1)
    if self_search:
        scores[q] = -1e9
    return scores.topk(5).indices.tolist()


def image_view(points: int = 120):
    config = Config.load(CONFIGS / "digits.yaml")
    task = TASKS["image"](config)
    torch.manual_seed(0)
    towers = task.build_towers(config).eval()
    return task, towers, task.report_view(towers, points=points, queries=4, seed=3)


def test_the_image_view_searches_the_held_out_images_and_marks_their_class():
    task, towers, view = image_view()
    test = task.data.test
    with torch.no_grad():
        z = task.encode(towers, "a", test.a[:120], None, torch.device("cpu"))
    assert len(view["map"]["x"]) == 120 and view["map"]["label"] == test.labels[:120].tolist()
    centred = F.normalize(z, dim=-1) - F.normalize(z, dim=-1).mean(0)  # PCA: the first two components
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    assert np.allclose(np.abs(view["map"]["x"]), (centred @ vh[0]).abs().numpy(), atol=1e-4)
    assert len(view["examples"]) == 4 and view["candidates"] == 120
    for example in view["examples"]:
        q = example["query"]["row"]
        rows = [r["row"] for r in example["results"]]
        assert rows == expected_top5(z, z, q, self_search=True)
        assert [r["right"] for r in example["results"]] == [bool(test.labels[i] == test.labels[q]) for i in rows]
        assert "png" in example["query"] and all("png" in r for r in example["results"])  # thumbnails
    again = task.report_view(towers, points=120, queries=4, seed=3)
    assert [e["query"]["row"] for e in again["examples"]] == [e["query"]["row"] for e in view["examples"]]  # seeded


def test_the_text_view_searches_the_pairs_and_marks_the_own_pair(tiny_bert):
    config = Config.load(CONFIGS / "text_tiny.yaml", [f"text.tower.model={tiny_bert}"])
    task = TASKS["text"](config)
    towers = task.build_towers(config).eval()
    view = task.report_view(towers, points=60, queries=5, seed=0)
    test = task.data.test
    with torch.no_grad():
        za = task.encode(towers, "a", test.a[:60], task.tokenize, torch.device("cpu"))
        zb = task.encode(towers, "b", test.b[:60], task.tokenize, torch.device("cpu"))
    for example in view["examples"]:
        q = example["query"]["row"]
        assert example["query"]["text"] == test.a[q]
        rows = [r["row"] for r in example["results"]]
        assert rows == expected_top5(za, zb, q, self_search=False)
        assert [r["right"] for r in example["results"]] == [i == q for i in rows]
        assert [r["text"] for r in example["results"]] == [test.b[i] for i in rows]


def report_page(tmp_path: Path) -> tuple[Path, list[str]]:
    """report.html of a made-up finished run with a real view of the digits."""
    _, _, view = image_view()
    view["hardware"] = "2 Ray Train workers on 1 node (vm), CPU"
    rows = [{"time": 1000 + 10 * s, "step": s, "epoch": s // 20, "loss": 5 - s / 20, "lr": 0.01, "temperature": 0.1,
             "samples_per_s": 300, "knn_top1": 0.5 + s / 400 if s % 20 == 0 else "", "stream_rows": 512,
             "skipped_rows": 0} for s in range(10, 70, 10)]
    final = {"knn_top1_trained": 0.65, "knn_top1_untrained": 0.6, "knn_top1_raw_pixels": 0.9}
    config = Config.load(CONFIGS / "digits.yaml").to_dict()
    page = run_report("digits-run", rows, ["knn_top1"], ["temperature"], final, view, config, "raw_pixels")
    path = tmp_path / "report.html"
    path.write_text(page)
    return path, ["loss", "lr", "temperature", "knn_top1"]


def test_the_report_lists_every_figure_and_renders_in_a_headless_browser(tmp_path):
    path, figures = report_page(tmp_path)
    page = path.read_text()
    for name in figures:  # a curve each
        assert f'alt="{name}"' in page, name
    assert "<td>knn_top1</td><td>0.6500</td><td>0.6000</td><td>0.9000</td>" in page  # the final table
    for part in ("Held-out embeddings", "Retrieval examples", "stream_rows", "2 Ray Train workers", "eval_bank_size"):
        assert part in page, part
    assert page.count('class="thumb"') == 4 * 6 and "http" not in page.replace("http-equiv", "")  # self-contained
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed (scripts/test.sh installs it)")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1200)
    inked = (pixels < 200).mean()  # text, tables and plots, not a blank page
    assert inked > 0.02 and pixels.std() > 20, (inked, pixels.std())


def test_a_sweep_report_holds_its_trials_plots_and_best_config(tmp_path):
    plot = tmp_path / "knn_top1_vs_temperature.png"
    Image.new("RGB", (40, 30), "red").save(plot)
    rows = [{"trial_id": "a", "loss.temperature": 0.1, "final_knn_top1": 0.8}, {"trial_id": "b", "loss.temperature": 0.2,
                                                                               "final_knn_top1": 0.7}]
    path = write_sweep_report(tmp_path, "temps", rows, ["trial_id", "loss.temperature", "final_knn_top1"], [plot],
                              {"loss": {"temperature": 0.1}})
    page = path.read_text()
    assert "<td>a</td><td>0.1000</td><td>0.8000</td>" in page and "<td>b</td><td>0.2000</td><td>0.7000</td>" in page
    assert "knn_top1_vs_temperature" in page and "temperature: 0.1" in page


def test_a_cell_shows_a_text_or_an_image_thumbnail_of_uint8_or_float_pixels():
    import base64
    import io

    from distributed_cl.tasks.base import Task

    assert Task.view_cell(["short", "x" * 400], 1) == {"text": "x" * 297 + "..."}
    gray = torch.arange(64, dtype=torch.uint8).reshape(1, 8, 8) * 4
    colour = torch.rand(3, 200, 100)  # floats in [0, 1], larger than a thumbnail
    for image, size, mode in ((gray, (8, 8), "L"), (colour, (48, 96), "RGB")):
        (png,) = Task.view_cell([image], 0).values()
        shown = Image.open(io.BytesIO(base64.b64decode(png)))
        assert (shown.size, shown.mode) == (size, mode)
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(Task.view_cell([gray], 0)["png"])))).tolist() == \
        gray[0].tolist()
