"""NTU RGB+D 60 / 120 importers on a tiny fixture in the official layout (file names are the labels).

The fixture: six performances (setup, subject, replication, action), each filmed by the three
cameras, i.e. 18 ``SsssCcccPpppRrrrAaaa_rgb.avi`` files spread over the layouts people extract
the archives into (``nturgb+d_rgb/``, ``nturgbd_rgb_s018/nturgb+d_rgb/``, straight in the root).
Expected split sizes and class counts are written out by hand below, not recomputed by the rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from step_ros.data.annotations import load_annotations
from conftest import import_through_the_cli
from step_ros.data.importers import (IMPORTERS, DatasetImportError, ImportOptions, load_pairs, write_import)
from step_ros.data.importers import ntu
from step_ros.data.video import write_video

# Copied from open-mmlab/mmaction2 tools/data/skeleton/gen_ntu_rgbd_raw.py (training_subjects_60,
# training_subjects_120, training_cameras_60, training_setups_120); the same lists are in
# Uason-Chen/CTR-GCN data/ntu/seq_transformation.py and data/ntu120/seq_transformation.py.
PUBLISHED_TRAIN_SUBJECTS_60 = [1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38]
PUBLISHED_TRAIN_SUBJECTS_120 = [
    1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38,
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82,
    83, 84, 85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103]
PUBLISHED_TRAIN_CAMERAS_60 = [2, 3]
PUBLISHED_TRAIN_SETUPS_120 = [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32]

#: (folder under the root, setup, subject, replication, action); every one filmed by cameras 1-3.
PERFORMANCES = [
    ("nturgb+d_rgb", 1, 1, 1, 8),          # P001 xsub train, S001 odd: xset test
    ("nturgb+d_rgb", 1, 3, 1, 9),          # P003 xsub test
    ("nturgb+d_rgb", 2, 2, 2, 9),          # P002 xsub train, S002 even: xset train
    ("nturgb+d_rgb", 2, 7, 1, 8),          # P007 xsub test, S002 xset train
    ("nturgbd_rgb_s018/nturgb+d_rgb", 18, 45, 1, 61),  # P045 train (120 list), S018 even; ntu60 leaves it out
    (".", 19, 44, 1, 62),                  # P044 test (not in the 120 list), S019 odd; ntu60 leaves it out
]
SIT, STAND = "sitting down", "standing up (from sitting position)"
PUT_ON, TAKE_OFF = "put on headphone", "take off headphone"


def name(setup: int, camera: int, subject: int, replication: int, action: int) -> str:
    return f"S{setup:03d}C{camera:03d}P{subject:03d}R{replication:03d}A{action:03d}_rgb.avi"


def tiny_video(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_video(path, rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8), fps=30)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ntu")
    for i, (folder, s, p, r, a) in enumerate(PERFORMANCES):
        for c in (1, 2, 3):
            tiny_video(root / folder / name(s, c, p, r, a), seed=10 * i + c)
    (root / "nturgb+d_skeletons").mkdir()
    (root / "nturgb+d_skeletons" / "S001C001P001R001A008.skeleton").write_text("0\n")  # ignored
    (root / "README.txt").write_text("downloaded from rose1.ntu.edu.sg\n")  # ignored
    (root / "nturgb+d_rgb" / "._S001C001P001R001A008_rgb.avi").write_bytes(b"\0" * 8)  # macOS metadata: hidden
    return root


def copy_root(src: Path, dst: Path) -> Path:
    """A private copy (links to the fixture's videos) that a test may break."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    return dst


def stems(result, split: str) -> set[str]:
    return {Path(r["video"]).name[:20] for r in result.rows if r["split"] == split}


def counts(result, split: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in result.rows:
        if r["split"] == split:
            out[r["action"]] = out.get(r["action"], 0) + 1
    return out


# --- the published membership rules -------------------------------------------------------------

def test_membership_rules_equal_the_published_lists():
    assert ntu.NTU60_TRAIN_SUBJECTS == set(PUBLISHED_TRAIN_SUBJECTS_60)
    assert ntu.NTU120_TRAIN_SUBJECTS == set(PUBLISHED_TRAIN_SUBJECTS_120)
    assert ntu.XVIEW_TRAIN_CAMERAS == set(PUBLISHED_TRAIN_CAMERAS_60)
    assert ntu.XSET_TRAIN_SETUPS == set(PUBLISHED_TRAIN_SETUPS_120)
    # The rules as the importer applies them, over every id the datasets have.
    ids = dict(setup=1, camera=1, replication=1, action=1)
    assert {p for p in range(1, 41) if ntu.split_of("ntu60", "xsub", {**ids, "subject": p}) == "train"} \
        == set(PUBLISHED_TRAIN_SUBJECTS_60)
    assert {p for p in range(1, 107) if ntu.split_of("ntu120", "xsub", {**ids, "subject": p}) == "train"} \
        == set(PUBLISHED_TRAIN_SUBJECTS_120)
    assert {s for s in range(1, 33) if ntu.split_of("ntu120", "xset", {**ids, "subject": 1, "setup": s})
            == "train"} == {s for s in range(1, 33) if s % 2 == 0}
    assert {c for c in (1, 2, 3) if ntu.split_of("ntu60", "xview", {**ids, "subject": 1, "camera": c})
            == "train"} == {2, 3}
    # 20 of NTU60's 40 subjects and 53 of NTU120's 106 train (half each).
    assert len(ntu.NTU60_TRAIN_SUBJECTS) == 20 and len(ntu.NTU120_TRAIN_SUBJECTS) == 53


def test_named_files_land_in_the_right_split():
    # The README's example name: setup 1, camera 2, performer 3, replication 2, action 13.
    ids = ntu.parse_name("S001C002P003R002A013_rgb.avi")
    assert ids == {"setup": 1, "camera": 2, "subject": 3, "replication": 2, "action": 13}
    assert ntu.split_of("ntu60", "xsub", ids) == "test"      # P003 is not a training subject
    assert ntu.split_of("ntu60", "xview", ids) == "train"    # camera 2 trains
    assert ntu.split_of("ntu120", "xset", ids) == "test"     # setup 1 is odd
    ids = ntu.parse_name("S018C001P045R001A061_rgb.avi")
    assert ntu.split_of("ntu120", "xsub", ids) == "train"    # P045 is in the NTU120 list
    assert ntu.split_of("ntu120", "xset", ids) == "train"    # setup 18 is even
    ids = ntu.parse_name("S032C003P106R002A120_rgb.avi")
    assert ntu.split_of("ntu120", "xsub", ids) == "test" and ntu.split_of("ntu120", "xset", ids) == "train"
    assert ntu.parse_name("S001C002P003R002A013.skeleton") is None


def test_class_names_are_the_official_ones():
    assert len(ntu.ACTIONS) == 120
    assert ntu.ACTIONS[0] == "drink water" and ntu.ACTIONS[59] == "walking apart from each other"
    assert ntu.ACTIONS[15] == "wear a shoe" and ntu.ACTIONS[119].startswith("finger-guessing game")
    for dataset, n in (("ntu60", 60), ("ntu120", 120)):
        labels = set(ntu.ACTIONS[:n])
        pairs = load_pairs(dataset)["tasks"]["action"]
        assert all(a in labels and b in labels for a, b in pairs)
    assert len(load_pairs("ntu120")["tasks"]["action"]) == load_pairs("ntu120")["papers_count"] == 9
    assert len(load_pairs("ntu60")["tasks"]["action"]) == 6


# --- the fixture: split sizes and class counts ---------------------------------------------------

def test_registered():
    assert IMPORTERS["ntu60"][1:3] == (("xsub", "xview"), "xsub")
    assert IMPORTERS["ntu120"][1:3] == (("xsub", "xset"), "xsub")


def test_ntu60_xsub(dataset_root):
    result = ntu.import_ntu60(dataset_root, ImportOptions(protocol="xsub"))
    assert result.tasks == {"action": list(ntu.ACTIONS[:60])}
    assert len(result.rows) == 12
    assert stems(result, "train") == {n[:20] for c in (1, 2, 3)
                                      for n in (name(1, c, 1, 1, 8), name(2, c, 2, 2, 9))}
    assert counts(result, "train") == {SIT: 3, STAND: 3}
    assert counts(result, "test") == {SIT: 3, STAND: 3}
    assert any("left out 6 videos of actions A061..A120" in n for n in result.notes)
    row = next(r for r in result.rows if Path(r["video"]).name == name(2, 3, 7, 1, 8))
    assert (row["_setup"], row["_camera"], row["_subject"], row["split"]) == (2, 3, 7, "test")
    assert Path(row["video"]).is_absolute() and row["start_frame"] is None and row["end_frame"] is None


def test_ntu60_xview(dataset_root):
    result = ntu.import_ntu60(dataset_root, ImportOptions(protocol="xview"))
    assert counts(result, "train") == {SIT: 4, STAND: 4}    # cameras 2 and 3
    assert counts(result, "test") == {SIT: 2, STAND: 2}     # camera 1
    assert all(r["_camera"] == 1 for r in result.rows if r["split"] == "test")


def test_ntu120_xsub(dataset_root):
    result = ntu.import_ntu120(dataset_root, ImportOptions())
    assert result.protocol == "xsub" and len(result.rows) == 18
    assert result.tasks == {"action": list(ntu.ACTIONS)}
    assert counts(result, "train") == {SIT: 3, STAND: 3, PUT_ON: 3}       # P001, P002, P045
    assert counts(result, "test") == {STAND: 3, SIT: 3, TAKE_OFF: 3}      # P003, P007, P044
    assert {r["_subject"] for r in result.rows if r["split"] == "train"} == {1, 2, 45}


def test_ntu120_xset(dataset_root):
    result = ntu.import_ntu120(dataset_root, ImportOptions(protocol="xset"))
    assert counts(result, "train") == {STAND: 3, SIT: 3, PUT_ON: 3}       # S002, S018
    assert counts(result, "test") == {SIT: 3, STAND: 3, TAKE_OFF: 3}      # S001, S019
    assert {r["_setup"] for r in result.rows if r["split"] == "train"} == {2, 18}
    assert not any("lack one or more" in n for n in result.notes)


def test_view_keeps_one_camera(dataset_root):
    result = ntu.import_ntu120(dataset_root, ImportOptions(view="C002"))
    assert len(result.rows) == 6 and {r["_camera"] for r in result.rows} == {2}
    with pytest.raises(DatasetImportError, match="cross-view"):
        ntu.import_ntu60(dataset_root, ImportOptions(protocol="xview", view="2"))
    with pytest.raises(DatasetImportError, match="camera id 1, 2 or 3"):
        ntu.import_ntu120(dataset_root, ImportOptions(view="4"))


# --- bad input: one line naming the file and what was expected -----------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_no_videos(tmp_path):
    (tmp_path / "nturgbd_rgb_s001.zip").write_bytes(b"PK")
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu120(tmp_path, ImportOptions())
    msg = one_line(exc)
    assert str(tmp_path) in msg and "SsssCcccPpppRrrrAaaa_rgb.avi" in msg and "extract them" in msg


def test_unexpected_file_name(dataset_root, tmp_path):
    root = copy_root(dataset_root, tmp_path / "root")
    bad = root / "nturgb+d_rgb" / "S001C001P001R001A08_rgb.avi"
    tiny_video(bad, 0)
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu120(root, ImportOptions())
    msg = one_line(exc)
    assert str(bad) in msg and "SsssCcccPpppRrrrAaaa_rgb.avi" in msg


def test_unknown_label(dataset_root, tmp_path):
    root = copy_root(dataset_root, tmp_path / "root")
    bad = root / "nturgb+d_rgb" / name(1, 1, 1, 1, 121)
    tiny_video(bad, 0)
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu120(root, ImportOptions())
    msg = one_line(exc)
    assert str(bad) in msg and "unknown label A121" in msg


def test_out_of_range_ids(dataset_root, tmp_path):
    root = copy_root(dataset_root, tmp_path / "root")
    bad = root / name(1, 4, 1, 1, 8)
    tiny_video(bad, 0)
    with pytest.raises(DatasetImportError, match="camera C004"):
        ntu.import_ntu120(root, ImportOptions())
    bad.unlink()
    bad = root / name(1, 1, 41, 1, 8)  # NTU60 has 40 subjects
    tiny_video(bad, 0)
    with pytest.raises(DatasetImportError, match="P041"):
        ntu.import_ntu60(root, ImportOptions())
    assert len(ntu.import_ntu120(root, ImportOptions()).rows) == 19  # a valid NTU120 subject


def test_duplicate_sample(dataset_root, tmp_path):
    root = copy_root(dataset_root, tmp_path / "root")
    tiny_video(root / "again" / name(1, 1, 1, 1, 8), 0)
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu120(root, ImportOptions())
    assert "S001C001P001R001A008" in one_line(exc) and "also at" in str(exc.value)


def test_listed_but_absent(dataset_root, tmp_path):
    root = copy_root(dataset_root, tmp_path / "root")
    broken = root / "nturgb+d_rgb" / name(1, 2, 3, 1, 9)
    broken.unlink()
    os.symlink(tmp_path / "gone.avi", broken)          # a link whose target is gone
    empty = root / "nturgb+d_rgb" / name(2, 1, 2, 2, 9)
    empty.unlink()
    empty.write_bytes(b"")                             # an interrupted download
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu120(root, ImportOptions())
    msg = one_line(exc)
    assert "2 videos are listed but absent" in msg and name(1, 2, 3, 1, 9) in msg and "--skip-missing" in msg
    result = ntu.import_ntu120(root, ImportOptions(skip_missing=True))
    assert len(result.rows) == 16
    assert sorted(Path(m).name for m in result.missing) == sorted([broken.name, empty.name])
    assert counts(result, "test") == {STAND: 2, SIT: 3, TAKE_OFF: 3}
    assert any("2 performances lack" in n for n in result.notes)


def test_fraction_is_refused(dataset_root):
    with pytest.raises(DatasetImportError, match="fraction"):
        ntu.import_ntu120(dataset_root, ImportOptions(fraction=0.1))


def test_ntu60_without_ntu60_samples(tmp_path):
    tiny_video(tmp_path / name(18, 1, 45, 1, 61), 0)
    with pytest.raises(DatasetImportError) as exc:
        ntu.import_ntu60(tmp_path, ImportOptions())
    assert "none of the 1 *_rgb.avi videos is a ntu60 sample" in one_line(exc)


# --- writing, and the whole path through the real CLI --------------------------------------------

def test_write_import(dataset_root, tmp_path):
    result = ntu.import_ntu60(dataset_root, ImportOptions(protocol="xview"))
    summary = write_import(result, tmp_path / "out")
    for f in ("annotations.csv", "labels.yaml", "pairs.yaml", "import.json"):
        assert (tmp_path / "out" / f).is_file()
    ds = load_annotations(tmp_path / "out" / "annotations.csv")
    assert ds.tasks == ["action"] and len(ds) == 12
    assert len(ds.filter(split="train")) == 8 and len(ds.filter(split="test")) == 4
    header = (tmp_path / "out" / "annotations.csv").read_text().splitlines()[0].split(",")
    assert {"_subject", "_camera", "_setup"} <= set(header)
    assert yaml.safe_load((tmp_path / "out" / "labels.yaml").read_text())["action"][7] == SIT
    assert summary["pairs"] == {"action": 6} and summary["splits"]["test"]["rows"] == 4


def test_full_path_import_extract_train_evaluate(dataset_root, tmp_path):
    import_through_the_cli(ntu.import_ntu120(dataset_root, ImportOptions(protocol="xsub")),
                                    tmp_path / "import", tmp_path, extract=["--device", "cpu"],
                                    train=["--optimizer", "sgd", "--device", "cpu", "--workers", "0"],
                                    evaluate=["--device", "cpu", "--workers", "0"])
