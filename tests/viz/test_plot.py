"""``nlnet plot``: Figure-4-style curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nlnet.cli import main
from nlnet.viz.curves import read_curves


def _run(d: Path, offset: float) -> Path:
    d.mkdir()
    recs = []
    for it in range(0, 1001, 50):
        recs.append(
            {
                "iteration": it,
                "split": "train",
                "error": 90 * np.exp(-it / 300) + offset,
                "loss": 1.0,
            }
        )
        if it % 250 == 0:
            recs.append(
                {"iteration": it, "split": "val", "error": 95 * np.exp(-it / 400) + offset + 5}
            )
    recs.append(
        {"iteration": 500, "split": "val", "error": 1.5}
    )  # a resumed run re-logged 500: last wins
    # the last line is being written by a running job
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"iter')
    return d


def test_read_curves_keeps_last_record_per_iteration(tmp_path: Path) -> None:
    c = read_curves(_run(tmp_path / "a", 0.0))
    assert c["train"][0][:3] == [0, 50, 100] and len(c["train"][0]) == 21
    assert c["val"][0] == [0, 250, 500, 750, 1000] and c["val"][1][2] == 1.5


def test_plot_writes_a_png_with_all_runs(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "c2d", 20.0), _run(tmp_path / "nl_c2d", 10.0)
    out = tmp_path / "fig" / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[0] > 300 and img.shape[1] > 500
    # both runs drawn: matplotlib's first two colours (C0 blue, C1 orange) are present
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(img - np.array(rgb)).sum(-1) < 30).sum() > 50, rgb


def test_plot_reports_bad_run_dirs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"iteration": 1, "spl\n{"iteration": 2}\n')
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:1: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
