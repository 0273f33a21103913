"""Kinetics / Charades / folder datasets in the official layouts (§4.1–4.3, §5.6, §6)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from nlnet.data import (
    AnnotationError,
    SeededSampler,
    build_dataset,
    list_datasets,
    parse_charades_actions,
    read_charades_csv,
    read_kinetics_csv,
    seed_worker,
)
from nlnet.data.sampling import evenly_spaced_clip_start, train_clip_start
from nlnet.data.transforms import short_side_size
from videos import band_profile, frame_index, make_frame_folder, make_video, truncate

# Clip-sized tensor ops are small: intra-op threads only add synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")


KINETICS_CSV = """label,youtube_id,time_start,time_end,split,is_cc
"air drumming",--nQbRBEz2s,104,114,val,0
abseiling,0wR5jVB-WPk,417,427,val,0
"zumba",zz_short,0,10,val,1
abseiling,MISSING_ID,1,11,val,0
"air drumming",orig_name,5,15,val,0
"""
# hand-written Charades rows: quoted fields with commas, empty actions/quality, 11 columns
CHARADES_CSV = (
    "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    'AAAAA,S1,Kitchen,6,7,Yes,"A person opens a door, then sits.",door;chair,'
    '"Person opens door; sits.","c001 0.00 0.50;c002 1.50 2.00;c003 0.90 1.10",2.0\n'
    "BBBBB,S2,Bedroom,,,No,Nothing happens.,,,,3.5\n"
    'CCCCC,S3,Garage,5,5,Yes,Someone runs.,car,Runs.,"c156 0.0 1.0",1.2\n'
    "GONE1,S4,Hall,5,5,Yes,x,,,c000 0 1,1.0\n"
)


@pytest.fixture(scope="module")
def kinetics_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    # crawler naming <label>/<id>_<start:06d>_<end:06d>.mp4 ...
    make_video(root / "air drumming" / "--nQbRBEz2s_000104_000114.mp4", 60)
    make_video(root / "abseiling" / "0wR5jVB-WPk_000417_000427.mp4", 50, gop=10)
    make_video(root / "zumba" / "zz_short_000000_000010.mp4", 20)  # shorter than 32 frames
    # ... and the original code's naming <label_with_underscores>/<id>.mp4
    make_video(root / "air_drumming" / "orig_name.mp4", 40)
    csv = root / "kinetics_val.csv"
    csv.write_text(KINETICS_CSV)
    return root, csv


def test_registry_lists_the_datasets():
    assert {"kinetics", "charades", "folder"} <= set(list_datasets())


def test_kinetics_csv_layouts_classes_and_missing(kinetics_root, tmp_path):
    root, csv = kinetics_root
    rows = read_kinetics_csv(csv)
    assert rows[0].label == "air drumming" and rows[0].youtube_id == "--nQbRBEz2s"
    assert (rows[0].time_start, rows[0].time_end, rows[2].split) == (104, 114, "val")
    report = tmp_path / "run" / "missing.txt"
    ds = build_dataset("kinetics", root=root, annotations=csv, missing_report=report)
    assert ds.classes == ["abseiling", "air drumming", "zumba"]  # alphabetical
    assert (ds.num_classes, ds.multi_label) == (3, False)
    assert ds.videos == ["--nQbRBEz2s", "0wR5jVB-WPk", "zz_short", "orig_name"]
    assert ds.missing == ["MISSING_ID"]
    assert report.read_text().startswith("MISSING_ID\t")
    assert [r.labels for r in ds.records] == [(1,), (0,), (2,), (1,)]
    assert ds.records[3].path.endswith("air_drumming/orig_name.mp4")
    assert int(ds[(3, 0)]["target"]) == 1
    with pytest.raises(ValueError, match="not among the given classes"):
        build_dataset("kinetics", root=root, annotations=csv, classes=["abseiling"])
    with pytest.raises(FileNotFoundError, match="none of the"):
        build_dataset("kinetics", root=tmp_path, annotations=csv)


def test_list_file_and_folder_datasets(kinetics_root, tmp_path):
    root, _ = kinetics_root
    lst = tmp_path / "val.txt"
    lst.write_text(
        "abseiling/0wR5jVB-WPk_000417_000427.mp4 0\n"
        "air_drumming/orig_name.mp4 1\n"
        f"{root}/zumba/zz_short_000000_000010.mp4 2\n"
    )
    ds = build_dataset("kinetics", root=root, annotations=lst)
    assert ds.classes == ["abseiling", "air_drumming", "zumba"]  # named after the folders
    assert [int(ds[(i, 1)]["target"]) for i in range(3)] == [0, 1, 2]
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 zero\n")
    with pytest.raises(AnnotationError, match=r"bad\.txt:1"):
        build_dataset("folder", root=root, annotations=bad)
    ds = build_dataset("folder", root=root)
    assert ds.classes == ["abseiling", "air drumming", "air_drumming", "zumba"]
    assert len(ds) == 4


def _indices(clip: torch.Tensor) -> list[int]:
    raw = clip * 57.375 + 114.75  # undo the original normalisation
    return [frame_index(raw[:, t].numpy()) for t in range(raw.shape[1])]


def test_train_clip_is_the_defined_sample(kinetics_root):
    root, csv = kinetics_root
    ds = build_dataset("kinetics", root=root, annotations=csv, clip_length=8, sampling_rate=3)
    directions = set()
    for i, n in [(0, 60), (1, 50)]:
        for seed in (0, 1, 2):
            item = ds[(i, seed)]
            assert item["clip"].shape == (3, 8, 224, 224)
            assert (item["index"], item["view"], item["valid"]) == (i, 0, True)
            start = train_clip_start(n, 8, 3, torch.Generator().manual_seed(seed))
            assert _indices(item["clip"]) == [start + 3 * j for j in range(8)]
            # flip and crop are the same for every frame: identical band profiles
            raw = item["clip"] * 57.375 + 114.75
            profiles = [band_profile(raw[:, t].numpy()) for t in range(8)]
            # (a 1-pixel shift of the ramp moves the profile by ~0.8 levels; a flip by ~100)
            assert all(np.abs(p - profiles[0]).mean() < 2 for p in profiles)
            directions.add(bool(profiles[0][-1] > profiles[0][0]))
            assert torch.equal(ds[(i, seed)]["clip"], item["clip"])  # seeded = reproducible
    assert directions == {True, False}  # some clips flipped, some not
    assert not torch.equal(ds[(0, 0)]["clip"], ds[(0, 1)]["clip"])
    # the 20-frame video wraps: 8 x 4 spans 32 frames
    ds = build_dataset("kinetics", root=root, annotations=csv, clip_length=8, sampling_rate=4)
    assert _indices(ds[(2, 0)]["clip"]) == [0, 4, 8, 12, 16, 0, 4, 8]


def test_test_views_and_val(kinetics_root):
    root, csv = kinetics_root
    ds = build_dataset(
        "kinetics", root=root, annotations=csv, mode="test", clip_length=4, sampling_rate=2,
        num_clips=5,
    )  # fmt: skip
    assert len(ds) == 4 * 5 * 3
    h, w = short_side_size(48, 64, 256)
    for n in (0, 7, 14, 15, 29):
        item = ds[n]
        video, view = divmod(n, 15)
        clip_k, _ = divmod(view, 3)
        assert (item["index"], item["view"], item["valid"]) == (video, view, True)
        assert item["clip"].shape == (3, 4, 256, 256)
        frames = 60 if video == 0 else 50
        start = evenly_spaced_clip_start(frames, 5, clip_k)
        assert _indices(item["clip"]) == [(start + 2 * j) % frames for j in range(4)]
    # the three crops of one clip are windows at the left, centre and right of the same frames
    means = [band_profile((ds[v]["clip"][:, 0] * 57.375 + 114.75).numpy()).mean() for v in range(3)]
    assert means[0] < means[1] < means[2]
    full = build_dataset("kinetics", root=root, annotations=csv, mode="test", test_crop="full")
    assert len(full) == 4 * 10 and full[0]["clip"].shape == (3, 32, h, w)
    val = build_dataset("kinetics", root=root, annotations=csv, mode="val", clip_length=4)
    assert len(val) == 4
    assert torch.equal(val[1]["clip"], val[1]["clip"])  # fixed draws per index
    assert val[1]["clip"].shape == (3, 4, 224, 224)


def test_target_fps_resamples_by_time(kinetics_root):
    root, csv = kinetics_root
    # the 25 fps videos read at 12.5 fps: frame j is native frame 2j
    ds = build_dataset(
        "kinetics", root=root, annotations=csv, mode="test", num_clips=2, clip_length=4,
        sampling_rate=1, target_fps=12.5, test_crop="center", test_scale=64,
    )  # fmt: skip
    assert len(ds) == 4 * 2
    assert _indices(ds[1]["clip"]) == [30, 32, 34, 36]  # clip 1 of 60 native = 30 resampled
    assert _indices(ds[2]["clip"]) == [0, 2, 4, 6]


@pytest.fixture
def broken_root(tmp_path):
    make_video(tmp_path / "a" / "good.mp4", 30)
    (tmp_path / "a" / "zero.mp4").write_bytes(b"")
    (tmp_path / "a" / "text.mp4").write_text("<html>404</html>")
    truncate(make_video(tmp_path / "b" / "cut.mp4", 30), 0.6)
    return tmp_path


def test_broken_videos_are_replaced_in_training_and_flagged_in_test(broken_root, caplog):
    kw = dict(root=broken_root, clip_length=4, jitter=(64, 72), crop_size=48)
    ds = build_dataset("folder", **kw)
    names = [v.split("/")[1] for v in ds.videos]
    good = names.index("good.mp4")
    for i in range(len(ds)):
        item = ds[(i, 3)]
        assert item["valid"] and item["index"] == good  # every broken one replaced
    broken = {r.path for r in ds.records if not r.path.endswith("good.mp4")}
    assert set(ds.failures) == broken  # each broken file hit at least once, counted
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert ds.failure_count == len(warnings) >= 3
    assert any("zero.mp4: empty file" in w for w in warnings)
    assert "empty file" in ds.failure_reasons[ds.records[names.index("zero.mp4")].path]
    test = build_dataset("folder", mode="test", num_clips=2, test_scale=64, **kw)
    for n in range(len(test)):
        item = test[n]
        assert item["valid"] == (item["index"] == good)
        if not item["valid"]:
            assert item["clip"].abs().sum() == 0 and item["clip"].shape == (3, 4, 64, 64)
    val = build_dataset("folder", mode="val", **kw)
    assert [val[i]["valid"] for i in range(len(val))] == [i == good for i in range(4)]
    (broken_root / "a" / "good.mp4").unlink()
    (broken_root / "a" / "zero.mp4").unlink()
    all_bad = build_dataset("folder", max_retries=4, **kw)
    with pytest.raises(RuntimeError, match="5 videos in a row"):
        all_bad[(0, 0)]


def test_charades_parser_matches_hand_written_rows(tmp_path):
    assert parse_charades_actions("c092 11.90 21.20;c147 0.00 12.60") == [
        (92, 11.9, 21.2),
        (147, 0.0, 12.6),
    ]
    assert parse_charades_actions("") == []
    with pytest.raises(ValueError, match="c157"):
        parse_charades_actions("c157 0 1")
    csv = tmp_path / "Charades_v1_train.csv"
    csv.write_text(CHARADES_CSV)
    rows = read_charades_csv(csv)
    assert [r.id for r in rows] == ["AAAAA", "BBBBB", "CCCCC", "GONE1"]
    assert rows[0].actions == ((1, 0.0, 0.5), (2, 1.5, 2.0), (3, 0.9, 1.1))
    assert rows[0].scene == "Kitchen" and rows[0].length == 2.0
    assert rows[1].actions == () and rows[1].length == 3.5
    assert rows[2].actions == ((156, 0.0, 1.0),)
    bad = tmp_path / "bad.csv"
    bad.write_text(CHARADES_CSV.replace("c156 0.0 1.0", "c156 0.0"))
    with pytest.raises(AnnotationError, match=r"bad\.csv:4 \(video CCCCC\)"):
        read_charades_csv(bad)


def test_charades_frames_videos_and_clip_labels(tmp_path):
    csv = tmp_path / "Charades_v1_train.csv"
    csv.write_text(CHARADES_CSV)
    (tmp_path / "Charades_v1_classes.txt").write_text(
        "".join(f"c{i:03d} Action number {i}\n" for i in range(157))
    )
    root = tmp_path / "Charades_v1_rgb"
    make_frame_folder(root / "AAAAA", 48)  # 2 s at 24 fps
    make_frame_folder(root / "BBBBB", 30)
    make_video(root / "CCCCC.mp4", 24, fps=24)  # a video instead of frames
    ds = build_dataset(
        "charades", root=root, annotations=csv, clip_length=4, sampling_rate=2,
        missing_report=tmp_path / "missing.txt",
    )  # fmt: skip
    assert (ds.num_classes, ds.multi_label, ds.labels) == (157, True, "clip")
    assert ds.classes[3] == "Action number 3" and ds.missing == ["GONE1"]
    assert ds.videos == ["AAAAA", "BBBBB", "CCCCC"]
    info = ds.probe(ds.records[0].path)
    rec = ds.records[0]

    def active(idx):
        return set(torch.nonzero(ds.target(rec, info, idx)).flatten().tolist())

    # frames 0..6 cover [0, 7/24) s: only c001 (0-0.5 s)
    assert active([0, 2, 4, 6]) == {1}
    # frames 20..26 cover [0.833, 1.125): c003 (0.9-1.1)
    assert active([20, 22, 24, 26]) == {3}
    # a wrapped clip covers [1.833, 2.0) and [0, 0.125): c002 and c001
    assert active([44, 46, 0, 2]) == {1, 2}
    # the seeded training item carries the labels of its own interval
    for seed in range(3):
        item = ds[(0, seed)]
        assert item["clip"].shape == (3, 4, 288, 288)  # 224 window rescaled to 288 (§4.3)
        first = _indices(item["clip"])[0]
        assert set(torch.nonzero(item["target"]).flatten().tolist()) == active(
            [first + 2 * j for j in range(4)]
        )
    assert ds[(1, 0)]["target"].sum() == 0  # a video without actions
    assert ds[(2, 0)]["target"].nonzero().flatten().tolist() == [156]  # read from the .mp4
    test = build_dataset("charades", root=root, annotations=csv, mode="test", clip_length=4)
    assert test.labels == "video" and test.test_scale == 320
    item = test[0]
    assert item["clip"].shape == (3, 4, 320, 320)
    assert set(torch.nonzero(item["target"]).flatten().tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="labels must be"):
        build_dataset("charades", root=root, annotations=csv, labels="frame")


def _batches(loader):
    return [(b["index"].tolist(), b["clip"]) for b in loader]


def test_dataloader_workers_reproducible_from_seed(kinetics_root):
    root, csv = kinetics_root
    ds = build_dataset(
        "kinetics", root=root, annotations=csv, clip_length=4, jitter=(40, 48), crop_size=32
    )
    pickle.loads(pickle.dumps(ds))  # workers get a copy

    def seeded(workers, seed):
        sampler = SeededSampler(
            RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), seed
        )
        return _batches(DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers))

    a, b, c = seeded(2, 7), seeded(0, 7), seeded(2, 8)
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))  # any #workers
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))

    def plain(seed):
        g = torch.Generator().manual_seed(seed)
        return _batches(
            DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, generator=g,
                       worker_init_fn=seed_worker)
        )  # fmt: skip

    p, q = plain(3), plain(3)
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(p, q))


def test_seeded_sampler_with_distributed_sampler():
    from torch.utils.data import DistributedSampler

    data = list(range(10))
    ranks = [
        SeededSampler(DistributedSampler(data, num_replicas=2, rank=r, seed=1), 5, r)
        for r in (0, 1)
    ]
    keys = [list(s) for s in ranks]
    assert sorted(i for k in keys for i, _ in k) == data  # the shards cover the data set
    seeds = [sd for k in keys for _, sd in k]
    assert len(set(seeds)) == len(seeds)  # every item its own stream
    assert [list(s) for s in ranks] == keys  # same epoch, same keys
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != keys


def test_kinetics_test_csv_without_labels(tmp_path):
    make_video(tmp_path / "test" / "tst_000001_000011.mp4", 10)
    csv = tmp_path / "kinetics_test.csv"
    csv.write_text("youtube_id,time_start,time_end,split\ntst,1,11,test\n")
    ds = build_dataset(
        "kinetics", root=tmp_path / "test", annotations=csv, mode="test", classes=["a", "b"],
        num_clips=1, test_crop="center", clip_length=2, test_scale=48,
    )  # fmt: skip
    assert ds.videos == ["tst"] and int(ds[0]["target"]) == -1  # no label to score


def test_bad_arguments_are_named(kinetics_root):
    root, csv = kinetics_root
    for kw, msg in [
        ({"mode": "training"}, "mode must be"),
        ({"jitter": (200, 300)}, "jitter"),
        ({"test_crop": "five"}, "test_crop"),
        ({"normalization": "bgr"}, "normalization"),
        ({"target_fps": 0}, "target_fps"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build_dataset("kinetics", root=root, annotations=csv, **kw)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("ucf", root=root)
