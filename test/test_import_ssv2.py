"""Something-Something v2 importer on a tiny fixture in the official layout.

The fixture is the label package (labels/labels.json, train.json, validation.json) and
20bn-something-something-v2/<id>.webm.  labels.json is a subset of the real 174 classes with their
real indices (Hugging Face card HuggingFaceM4/something_something_v2; mmaction2
tools/data/sthv2/label_map.txt): every class of the shipped pairs plus three others, so that the
pairs file and make_manifest are valid on it.  The videos are tiny H.264 files written by
write_video and renamed to .webm (FFmpeg reads a file by its content, not its name).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import import_through_the_cli
from step_ros.data.annotations import load_annotations
from step_ros.data.importers import DatasetImportError, ImportOptions, load_pairs, write_import
from step_ros.data.importers.ssv2 import class_of_template, import_ssv2, lowdata_count
from step_ros.data.video import write_video

#: Real class names and indices of Something-Something v2 (a subset of the 174).
REAL_LABELS = {
    "Approaching something with your camera": 0,
    "Burying something in something": 4,
    "Closing something": 5,
    "Covering something with something": 6,
    "Digging something out of something": 7,
    "Folding something": 14,
    "Holding something": 16,
    "Moving away from something with your camera": 32,
    "Moving something and something away from each other": 36,
    "Moving something and something closer to each other": 37,
    "Moving something away from something": 40,
    "Moving something away from the camera": 41,
    "Moving something closer to something": 42,
    "Moving something down": 43,
    "Moving something towards the camera": 44,
    "Moving something up": 45,
    "Opening something": 46,
    "Picking something up": 47,
    "Pulling something from behind of something": 85,
    "Pulling something from left to right": 86,
    "Pulling something from right to left": 87,
    "Pushing something from left to right": 93,
    "Pushing something from right to left": 94,
    "Pushing something off of something": 95,
    "Pushing something onto something": 96,
    "Putting something behind something": 104,
    "Putting something in front of something": 105,
    "Putting something into something": 106,
    "Putting something on a surface": 109,
    "Putting something similar to other things that are already on the table": 114,
    "Removing something, revealing something behind": 121,
    "Spreading something onto something": 141,
    "Squeezing something": 143,
    "Taking one of many similar things on the table": 146,
    "Taking something out of something": 148,
    "Tearing something into two pieces": 149,
    "Turning the camera downwards while filming something": 165,
    "Turning the camera left while filming something": 166,
    "Turning the camera right while filming something": 167,
    "Turning the camera upwards while filming something": 168,
    "Uncovering something": 171,
    "Unfolding something": 172,
    "Wiping something off of something": 173,
}

#: (template as in train.json, placeholders, videos in train.json, videos in validation.json)
CLASSES = [
    ("Opening [something]", ["a jar"], 6, 2),
    ("Closing [something]", ["a jar"], 4, 2),
    ("Pushing [something] from left to right", ["a pen"], 3, 2),
    ("Pushing [something] from right to left", ["a pen"], 3, 2),
    ("Holding [something]", ["a cup"], 10, 2),
    ("Putting [something] into [something]", ["a coin", "a box"], 1, 1),
]
TRAIN_TRUTH = {class_of_template(t): n for t, _, n, _ in CLASSES}
TEST_TRUTH = {class_of_template(t): n for t, _, _, n in CLASSES}
N_TRAIN, N_TEST = sum(TRAIN_TRUTH.values()), sum(TEST_TRUTH.values())


def _entries(start: int, which: int) -> list[dict]:
    out, vid = [], start
    for template, placeholders, *counts in CLASSES:
        for _ in range(counts[which]):
            caption = template
            for p in placeholders:
                caption = caption.replace("[something]", p, 1)
            out.append({"id": str(vid), "label": caption.lower(), "template": template, "placeholders": placeholders})
            vid += 1
    return out


def _write_fixture(root: Path, old_names: bool = False) -> None:
    """The label package and the videos, in the release's layout (or the older 20BN file names)."""
    ann = root if old_names else root / "labels"
    ann.mkdir(parents=True, exist_ok=True)
    prefix = "something-something-v2-" if old_names else ""
    (ann / f"{prefix}labels.json").write_text(json.dumps({k: str(v) for k, v in REAL_LABELS.items()}, indent=1))
    train, val = _entries(1000, 0), _entries(5000, 1)
    (ann / f"{prefix}train.json").write_text(json.dumps(train))
    (ann / f"{prefix}validation.json").write_text(json.dumps(val))
    videos = root / "20bn-something-something-v2"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for e in train + val:
        frames = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
        tmp = write_video(videos / f"{e['id']}.mp4", frames, fps=12)
        os.replace(tmp, videos / f"{e['id']}.webm")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ssv2_pristine")
    _write_fixture(root)
    return root


@pytest.fixture
def ssv2_root(pristine, tmp_path) -> Path:
    root = tmp_path / "ssv2"
    shutil.copytree(pristine, root)
    return root


def _counts(result, split: str) -> dict[str, int]:
    return dict(Counter(r["fine_action"] for r in result.rows if r["split"] == split))


def _one_line_error(root: Path, options: ImportOptions | None = None) -> str:
    with pytest.raises(DatasetImportError) as info:
        import_ssv2(root, options or ImportOptions())
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- protocols and counts


def test_full_protocol_split_sizes_and_class_counts(ssv2_root):
    result = import_ssv2(ssv2_root, ImportOptions())
    assert result.dataset == "ssv2" and result.protocol == "full"
    assert list(result.tasks) == ["fine_action"]
    assert result.tasks["fine_action"] == sorted(REAL_LABELS, key=REAL_LABELS.get)  # labels.json index order
    assert len(result.rows) == N_TRAIN + N_TEST
    assert _counts(result, "train") == TRAIN_TRUTH
    assert _counts(result, "test") == TEST_TRUTH
    assert {r["split"] for r in result.rows} == {"train", "test"}  # no val split
    for r in result.rows:
        assert Path(r["video"]).is_absolute() and Path(r["video"]).is_file()
        assert r["video"].endswith(f"/20bn-something-something-v2/{r['_id']}.webm")
        assert r["start_frame"] is None and r["end_frame"] is None and r["context"] is None
    assert result.missing == []


def test_older_file_names_are_accepted(tmp_path):
    _write_fixture(tmp_path / "old", old_names=True)
    result = import_ssv2(tmp_path / "old", ImportOptions())
    assert _counts(result, "train") == TRAIN_TRUTH and _counts(result, "test") == TEST_TRUTH


def test_lowdata_takes_a_share_of_each_class(ssv2_root):
    result = import_ssv2(ssv2_root, ImportOptions(protocol="lowdata", fraction=0.25, seed=0))
    # floor(0.25 n + 0.5), at least 1: 6 -> 2, 4 -> 1, 3 -> 1, 10 -> 3 (2.5 rounds up), 1 -> 1
    expected = {name: lowdata_count(n, 0.25) for name, n in TRAIN_TRUTH.items()}
    assert expected == {"Opening something": 2, "Closing something": 1, "Pushing something from left to right": 1,
                        "Pushing something from right to left": 1, "Holding something": 3,
                        "Putting something into something": 1}
    assert _counts(result, "train") == expected
    assert _counts(result, "test") == TEST_TRUTH  # the full validation set stays the test set
    assert result.options == {"fraction": 0.25, "seed": 0,
                              "rounding": "per class: floor(fraction * n + 0.5), at least 1 video"}
    again = import_ssv2(ssv2_root, ImportOptions(protocol="lowdata", fraction=0.25, seed=0))
    assert [r["_id"] for r in again.rows] == [r["_id"] for r in result.rows]  # seeded: the same draw


def test_lowdata_sets_are_nested_for_one_seed(ssv2_root):
    ids = {}
    for f in (0.05, 0.10, 0.25):
        res = import_ssv2(ssv2_root, ImportOptions(protocol="lowdata", fraction=f, seed=3))
        ids[f] = {r["_id"] for r in res.rows if r["split"] == "train"}
    assert len(ids[0.05]) == len(ids[0.10]) == len(TRAIN_TRUTH)  # one video per class
    assert ids[0.05] <= ids[0.10] <= ids[0.25]


def test_protocol_options_are_checked(ssv2_root):
    assert "--fraction" in _one_line_error(ssv2_root, ImportOptions(protocol="lowdata"))
    assert "lowdata" in _one_line_error(ssv2_root, ImportOptions(protocol="full", fraction=0.1))
    assert "between 0 and 1" in _one_line_error(ssv2_root, ImportOptions(protocol="lowdata", fraction=1.5))
    assert "unknown protocol" in _one_line_error(ssv2_root, ImportOptions(protocol="test"))


# ---------------------------------------------------------------- bad inputs: one line each


def test_missing_annotation_file(ssv2_root):
    (ssv2_root / "labels" / "train.json").unlink()
    msg = _one_line_error(ssv2_root)
    assert "missing annotation file" in msg and "train.json" in msg


def test_missing_label_package(ssv2_root):
    shutil.rmtree(ssv2_root / "labels")
    msg = _one_line_error(ssv2_root)
    assert "missing annotation file" in msg and "labels.json" in msg


def test_renamed_column(ssv2_root):
    path = ssv2_root / "labels" / "validation.json"
    entries = json.loads(path.read_text())
    for e in entries:
        e["action"] = e.pop("template")
    path.write_text(json.dumps(entries))
    msg = _one_line_error(ssv2_root)
    assert str(path) in msg and "'template'" in msg


def test_unexpected_layout_of_labels_json(ssv2_root):
    path = ssv2_root / "labels" / "labels.json"
    path.write_text(json.dumps(sorted(REAL_LABELS)))  # a list of names, not {name: "index"}
    msg = _one_line_error(ssv2_root)
    assert str(path) in msg and "index" in msg


def test_unknown_label(ssv2_root):
    path = ssv2_root / "labels" / "train.json"
    entries = json.loads(path.read_text())
    entries[4]["template"] = "Juggling [something]"
    path.write_text(json.dumps(entries))
    msg = _one_line_error(ssv2_root)
    assert "unknown label 'Juggling something'" in msg and str(path) in msg


def test_absent_video_is_an_error_or_skipped(ssv2_root):
    gone = ssv2_root / "20bn-something-something-v2" / "1003.webm"
    gone.unlink()
    msg = _one_line_error(ssv2_root)
    assert f"1 of {N_TRAIN + N_TEST} listed videos" in msg and str(gone) in msg and "--skip-missing" in msg
    result = import_ssv2(ssv2_root, ImportOptions(skip_missing=True))
    assert result.missing == [str(gone)]
    assert len(result.rows) == N_TRAIN + N_TEST - 1
    assert "1003" not in {r["_id"] for r in result.rows}


# ---------------------------------------------------------------- written files and the full path


def test_write_import_files_load(ssv2_root, tmp_path):
    result = import_ssv2(ssv2_root, ImportOptions())
    out = tmp_path / "imported"
    summary = write_import(result, out)
    for name in ("annotations.csv", "labels.yaml", "pairs.yaml", "import.json"):
        assert (out / name).is_file()
    ds = load_annotations(out / "annotations.csv")
    assert len(ds) == N_TRAIN + N_TEST and ds.tasks == ["fine_action"] and ds.splits == ["test", "train"]
    assert Counter(s.labels["fine_action"] for s in ds if s.split == "train") == TRAIN_TRUTH
    labels = yaml.safe_load((out / "labels.yaml").read_text())
    assert labels == {"fine_action": sorted(REAL_LABELS, key=REAL_LABELS.get)}
    pairs = yaml.safe_load((out / "pairs.yaml").read_text())
    assert pairs["papers_count"] is None and len(pairs["tasks"]["fine_action"]) == 20
    assert summary["splits"]["train"]["rows"] == N_TRAIN and summary["splits"]["test"]["rows"] == N_TEST
    assert json.loads((out / "import.json").read_text())["pairs"] == {"fine_action": 20}


def test_registered_with_its_protocols():
    from step_ros.data.importers import IMPORTERS

    fn, protocols, default, _ = IMPORTERS["ssv2"]
    assert fn is import_ssv2 and protocols == ("full", "lowdata") and default == "full"


def test_shipped_pairs_use_real_class_names():
    pairs = load_pairs("ssv2")["tasks"]["fine_action"]
    flat = [name for pair in pairs for name in pair]
    assert len(flat) == len(set(flat)) == 40
    assert set(flat) <= set(REAL_LABELS)


def test_full_path_import_extract_train_evaluate(ssv2_root, tmp_path):
    report = import_through_the_cli(import_ssv2(ssv2_root, ImportOptions()), tmp_path / "imported", tmp_path,
                                    extract=["--workers", "0"], train=["--split", "train", "--workers", "0"],
                                    evaluate=["--split", "test", "--workers", "0"])
    normal = report["tasks"]["fine_action"]["orders"]["normal"]["all"]
    assert 0.0 <= normal["top1"] <= 1.0
    assert normal["symmetric"] is not None  # test videos of two shipped pairs: opening / closing, pushing l-r / r-l
