"""``step-ros import drive_and_act``: a tiny Drive&Act in the publisher's layout, the rows it gives,
one clear error per broken input, and the full path import -> extract -> train -> evaluate."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, import_through_the_cli
from step_ros.data.annotations import load_annotations
from step_ros.data.importers import (IMPORTERS, DatasetImportError, ImportOptions, load_pairs, write_import)
from step_ros.data.importers import drive_and_act as da
from step_ros.data.video import write_video

HEADER = ["participant_id", "file_id", "annotation_id", "frame_start", "frame_end", "activity", "chunk_id"]
NUM_FRAMES = 24

#: (participant, run) -> annotations (activity, start, end, chunk length); chunks are cut like the
#: publisher's: contiguous, each chunk's end the next one's start
RUNS = {
    "train": {(1, "run1_2018-05-22-13-00-00"): [("opening_bottle", 0, 8, 8), ("drinking", 8, 14, 8),
                                               ("closing_bottle", 14, 24, 6)],
              (2, "run1_2018-05-23-13-00-00"): [("opening_bottle", 2, 10, 8), ("closing_bottle", 10, 16, 8),
                                               ("sitting_still", 16, 24, 4)]},
    "val": {(3, "run1_2018-05-24-13-00-00"): [("opening_bottle", 0, 8, 8), ("closing_bottle", 8, 16, 8)]},
    "test": {(4, "run2_2018-05-25-13-00-00"): [("opening_bottle", 0, 8, 8), ("closing_bottle", 8, 16, 8),
                                               ("drinking", 16, 24, 8)]},
}


def chunk_rows(subset: str, view: str = "kinect_color") -> list[list]:
    """The CSV rows of one subset, one per chunk."""
    rows = []
    for (participant, run), spans in RUNS[subset].items():
        for ann_id, (activity, start, end, size) in enumerate(spans):
            for chunk_id, s in enumerate(range(start, end, size)):
                rows.append([participant, f"vp{participant}/{run}.{view}", ann_id, s, min(s + size, end), activity,
                             chunk_id])
    return rows


def expected() -> dict[str, Counter]:
    return {subset: Counter(r[5] for r in chunk_rows(subset)) for subset in RUNS}


def write_csv(path: Path, rows: list[list], header: list[str] = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_dataset(root: Path, view: str = "kinect_color") -> Path:
    """activities_3s/<view>/midlevel.chunks_90.split_<k>.<subset>.csv for splits 0 and 1, and <view>/<file_id>.mp4."""
    rng = np.random.default_rng(0)
    for subset in RUNS:
        write_csv(root / "activities_3s" / view / f"midlevel.chunks_90.split_0.{subset}.csv", chunk_rows(subset, view))
    # split 1: train and test swapped (the publisher rotates participants between splits)
    swap = {"train": "test", "val": "val", "test": "train"}
    for subset in RUNS:
        write_csv(root / "activities_3s" / view / f"midlevel.chunks_90.split_1.{subset}.csv",
                  chunk_rows(swap[subset], view))
    for subset in RUNS:
        for participant, run in RUNS[subset]:
            frames = rng.integers(0, 256, size=(NUM_FRAMES, 32, 32, 3), dtype=np.uint8)
            write_video(root / view / f"vp{participant}" / f"{run}.{view}.mp4", frames, fps=15)
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return make_dataset(tmp_path / "driveandact")


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_rows_split_sizes_and_class_counts(root):
    result = da.import_drive_and_act(root, ImportOptions())
    assert result.protocol == "split0" and result.options["view"] == "kinect_color"
    assert result.tasks == {"fine_action": list(da.CLASSES)} and len(da.CLASSES) == 34
    truth = expected()
    got = {s: Counter(r["fine_action"] for r in result.rows if r["split"] == s) for s in RUNS}
    assert got == truth
    assert {s: sum(c.values()) for s, c in got.items()} == {"train": 8, "val": 2, "test": 3}
    first = result.rows[0]
    assert first["video"] == str(root.resolve() / "kinect_color" / "vp1" / "run1_2018-05-22-13-00-00.kinect_color.mp4")
    assert (first["start_frame"], first["end_frame"], first["_subject"], first["_chunk_id"]) == (0, 8, 1, 0)
    # frame_end is exclusive and kept: the chunks of an annotation tile it without overlap
    drinking = [r for r in result.rows if r["_subject"] == 1 and r["fine_action"] == "drinking"]
    assert [(r["start_frame"], r["end_frame"]) for r in drinking] == [(8, 14)]
    assert {r["_subject"] for r in result.rows if r["split"] == "test"} == {4}
    # split 1 is a different assignment of participants
    one = da.import_drive_and_act(root, ImportOptions(protocol="split1"))
    assert Counter(r["split"] for r in one.rows) == {"train": 3, "val": 2, "test": 8}
    assert "drive_and_act" in IMPORTERS and IMPORTERS["drive_and_act"][1:3] == (da.PROTOCOLS, "split0")


def test_pairs_are_the_papers_ten_and_use_class_names():
    pairs = load_pairs("drive_and_act")
    plist = pairs["tasks"]["fine_action"]
    assert pairs["papers_count"] == 10 and len(plist) == 10
    flat = [c for p in plist for c in p]
    assert len(set(flat)) == 20 and set(flat) <= set(da.CLASSES)
    assert len(set(da.CLASSES) - set(flat)) == 14  # the papers' 14 non-symmetric classes
    papers = yaml.safe_load((ROOT / "step_ros/data/importers/papers/drive_and_act.yaml").read_text())
    assert papers["dataset"] == "drive_and_act" and all(r["source"] for r in papers["rows"])


def test_missing_annotation_file(root):
    (root / "activities_3s" / "kinect_color" / "midlevel.chunks_90.split_0.val.csv").unlink()
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions())
    assert "midlevel.chunks_90.split_0.val.csv" in one_line(err) and "missing" in one_line(err)


def test_unexpected_layout(tmp_path, root):
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(tmp_path / "elsewhere", ImportOptions())
    assert "activities_3s" in one_line(err)
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions(view="inner_mirror"))
    assert "inner_mirror" in one_line(err) and "kinect_color" in one_line(err)
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions(protocol="split3"))
    assert "split0" in one_line(err)


def test_renamed_column(root):
    path = root / "activities_3s" / "kinect_color" / "midlevel.chunks_90.split_0.train.csv"
    write_csv(path, chunk_rows("train"), header=[*HEADER[:5], "label", HEADER[6]])
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions())
    msg = one_line(err)
    assert str(path) in msg and "activity" in msg and "label" in msg


def test_unknown_label(root):
    path = root / "activities_3s" / "kinect_color" / "midlevel.chunks_90.split_0.test.csv"
    rows = chunk_rows("test")
    rows[1][5] = "juggling"
    write_csv(path, rows)
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions())
    msg = one_line(err)
    assert str(path) in msg and "line 3" in msg and "juggling" in msg


def test_missing_video_with_and_without_skip_missing(root):
    gone = root / "kinect_color" / "vp3" / "run1_2018-05-24-13-00-00.kinect_color.mp4"
    gone.unlink()
    with pytest.raises(DatasetImportError) as err:
        da.import_drive_and_act(root, ImportOptions())
    msg = one_line(err)
    assert "1 of 4 videos" in msg and str(gone) in msg and "--skip-missing" in msg
    result = da.import_drive_and_act(root, ImportOptions(skip_missing=True))
    assert result.missing == [str(gone)]
    assert Counter(r["split"] for r in result.rows) == {"train": 8, "test": 3}
    summary = write_import(result, root.parent / "out")
    assert summary["missing_videos"] == 1 and "val" not in summary["splits"]


def test_annotations_inside_the_archive_folder(tmp_path):
    root = make_dataset(tmp_path / "d")
    (root / "iccv_activities_3s").mkdir()
    (root / "activities_3s").rename(root / "iccv_activities_3s" / "activities_3s")
    assert len(da.import_drive_and_act(root, ImportOptions()).rows) == 13


def test_write_import_outputs_load(root, tmp_path):
    out = tmp_path / "imported"
    summary = write_import(da.import_drive_and_act(root, ImportOptions()), out)
    for name in ("annotations.csv", "labels.yaml", "pairs.yaml", "import.json"):
        assert (out / name).is_file(), name
    ds = load_annotations(out / "annotations.csv")
    assert len(ds) == 13 and ds.tasks == ["fine_action"] and set(ds.splits) == {"train", "val", "test"}
    truth = expected()
    for subset, counts in truth.items():
        assert Counter(s.labels["fine_action"] for s in ds.filter(split=subset)) == counts
    assert summary["splits"]["train"]["classes"]["fine_action"] == dict(sorted(truth["train"].items()))
    assert yaml.safe_load((out / "labels.yaml").read_text()) == {"fine_action": list(da.CLASSES)}
    assert len(yaml.safe_load((out / "pairs.yaml").read_text())["tasks"]["fine_action"]) == 10
    assert json.loads((out / "import.json").read_text())["pairs"] == {"fine_action": 10}


def test_full_path_import_extract_train_evaluate(root, tmp_path):
    report = import_through_the_cli(da.import_drive_and_act(root, ImportOptions()), tmp_path / "imported", tmp_path,
                                    evaluate=["--clips", "1"])
    head = report["tasks"]["fine_action"]
    assert report["num_samples"] == 3 and head["labels"] == list(da.CLASSES)
    assert len(head["symmetric_pairs"]) == 10
