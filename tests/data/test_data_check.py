"""``nlnet data-check`` on a small Kinetics-style download with missing and broken videos."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nlnet.cli import main
from videos import make_frame_folder, make_video, truncate

# Clip-sized tensor ops are small: intra-op threads only add synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")


CSV = """label,youtube_id,time_start,time_end,split,is_cc
"air drumming",aaa,0,10,train,0
abseiling,bbb,5,15,train,0
abseiling,ccc,5,15,train,0
abseiling,ddd,5,15,train,0
"air drumming",eee,1,11,train,0
"""


def _download(tmp_path):
    root = tmp_path / "k400"
    make_video(root / "air drumming" / "aaa_000000_000010.mp4", 30, fps=25, size=(64, 48))
    make_video(root / "abseiling" / "bbb_000005_000015.mp4", 20, fps=30, size=(48, 64))
    (root / "abseiling" / "ccc_000005_000015.mp4").write_bytes(b"")
    truncate(make_video(root / "air drumming" / "eee_000001_000011.mp4", 30), 0.5)
    csv = tmp_path / "train.csv"
    csv.write_text(CSV)
    return root, csv


def test_data_check_json(tmp_path, capsys):
    root, csv = _download(tmp_path)
    out = tmp_path / "check"
    rc = main(
        ["data-check", "--dataset", "kinetics", "--root", str(root), "--csv", str(csv), "--json",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # exactly one JSON object on stdout
    assert report["videos"] == ["aaa", "bbb"]
    assert report["classes"] == ["abseiling", "air drumming"]
    assert report["missing"] == ["ddd"]
    assert sorted(p.split("/")[-1] for p in report["unreadable"]) == [
        "ccc_000005_000015.mp4",
        "eee_000001_000011.mp4",
    ]
    reasons = report["unreadable_reasons"]
    assert any("empty file" in r for r in reasons.values())
    assert (report["fps"]["min"], report["fps"]["max"]) == (25.0, 30.0)
    assert (report["width"]["min"], report["width"]["max"]) == (48, 64)
    assert report["duration_s"]["max"] == 1.2
    sheet = Image.open(report["contact_sheet"])
    assert sheet.format == "PNG" and sheet.height > 2 * 72  # two rows of thumbnails
    assert json.loads((out / "summary.json").read_text())["missing"] == ["ddd"]
    assert "checking videos" in captured.err  # the progress bar is on stderr


def test_data_check_text_folder_and_charades(tmp_path, capsys):
    root, _ = _download(tmp_path)
    rc = main(
        ["data-check", "--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "o")]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "readable    2 (of 4 checked)" in stdout
    assert "unreadable  2" in stdout and "empty file" in stdout
    # Charades frame folders
    frames = tmp_path / "rgb"
    make_frame_folder(frames / "XYZ01", 24)
    csv = tmp_path / "Charades_v1_test.csv"
    csv.write_text(
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
        'XYZ01,S,Hall,5,5,Yes,x,,,"c010 0.0 0.5",1.0\n'
    )
    rc = main(
        ["data-check", "--dataset", "charades", "--root", str(frames), "--csv", str(csv),
         "--out", str(tmp_path / "c")]
    )  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["fps"]["min"] == 24.0


def test_scan_is_a_library_function(tmp_path, capsys):
    from nlnet.data.check import scan

    root, csv = _download(tmp_path)
    summary = scan("kinetics", root, csv, out=tmp_path / "lib", max_videos=2, sheet_videos=1)
    assert summary["num_checked"] == 2 and summary["num_listed"] == 5
    assert json.loads((tmp_path / "lib" / "summary.json").read_text()) == summary
    with pytest.raises(ValueError, match="charades needs --csv"):
        scan("charades", root, out=tmp_path / "x")
    rc = main(["data-check", "--dataset", "charades", "--root", str(root)])
    assert rc == 2 and "charades needs --csv" in capsys.readouterr().err
