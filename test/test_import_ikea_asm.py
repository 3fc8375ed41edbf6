"""``step-ros import ikea_asm``: a tiny IKEA-ASM in the official layout (annotation sqlite
database, indexing_files/ lists, <Furniture>/<scan>/<dev>/images/scan_video.avi), its known
segment counts, one-line errors for each broken input, and the whole path import -> extract ->
train -> evaluate through the real CLI."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import import_through_the_cli
from step_ros.data.annotations import load_annotations
from step_ros.data.importers import IMPORTERS, DatasetImportError, ImportOptions, write_import
from step_ros.data.importers.ikea_asm import import_ikea_asm
from step_ros.data.video import write_video

# The dataset's 32 classes as its atomic_action_list.txt names them, deliberately unsorted (the
# importer sorts them as the official loader does), with (atomic action text, object) per class.
COMPOUND = {"pick up": ["leg", "table top", "shelf", "side panel", "front panel", "back panel", "bottom panel", "pin"],
            "lay down": ["leg", "table top", "shelf", "side panel", "front panel", "back panel", "bottom panel"],
            "flip": ["table top", "table", "shelf"], "push": ["table top", "table"]}
PLAIN = ["align leg screw with table thread", "spin leg", "tighten leg", "rotate table", "attach shelf to table",
         "align side panel holes with front panel dowels", "attach drawer side panel", "attach drawer back panel",
         "slide bottom of drawer", "insert drawer pin", "position the drawer right side up", "other"]
OBJECTS = ["leg", "table top", "shelf", "side panel", "front panel", "back panel", "bottom panel", "pin", "table"]
VERBS = [f"{v} ..." for v in COMPOUND] + PLAIN  # atomic_actions rows 2.. (row 1 is blank, as in the toolbox)

SCANS = {  # scan -> (split list or None, environment)
    "Lack_Side_Table/0001_black_table_02_01_2019_08_16_14_00": ("train", "env1"),
    "Lack_Coffee_Table/0002_white_table_06_01_2019_08_20_10_00": ("train", "env3"),
    "Kallax_Shelf_Drawer/0003_oak_floor_04_01_2019_08_21_11_00": ("test", "env2"),
    "Lack_TV_Bench/0004_black_table_09_01_2019_08_22_09_00": (None, "env5"),
}
NFRAMES = 24


def aid(text: str) -> int:
    return VERBS.index(text) + 2


def oid(obj: str | None) -> int:
    return 1 if obj is None else OBJECTS.index(obj) + 2


def pair(name: str) -> tuple[int, int]:
    for verb, objs in COMPOUND.items():
        for obj in objs:
            if name == f"{verb} {obj}":
                return aid(f"{verb} ..."), oid(obj)
    return aid(name), 1


# dev3 annotations per scan: (class name, start, end); "flip leg" is not a class (left out, NA).
ANNOTATIONS = {
    "Lack_Side_Table/0001_black_table_02_01_2019_08_16_14_00": [
        ("pick up leg", 2, 6), ("lay down leg", 8, 12), ("spin leg", 12, 18), ("flip leg", 18, 20),
        ("tighten leg", 20, 30)],  # runs past nframes: clipped to 24
    "Lack_Coffee_Table/0002_white_table_06_01_2019_08_20_10_00": [
        ("pick up table top", 0, 5), ("lay down table top", 5, 10), ("flip table top", 10, 16), ("other", 16, 24)],
    "Kallax_Shelf_Drawer/0003_oak_floor_04_01_2019_08_21_11_00": [
        ("pick up leg", 4, 8), ("lay down leg", 10, 14), ("pick up shelf", 15, 15)],  # an empty one: left out
    "Lack_TV_Bench/0004_black_table_09_01_2019_08_22_09_00": [("pick up leg", 0, 4)],  # in no split list
}
# What the importer must produce from that (NA = frames no kept annotation covers).
TRUTH = {
    "train": {"NA": 3, "pick up leg": 1, "lay down leg": 1, "spin leg": 1, "tighten leg": 1, "pick up table top": 1,
              "lay down table top": 1, "flip table top": 1, "other": 1},
    "test": {"NA": 3, "pick up leg": 1, "lay down leg": 1},
}


def class_names() -> list[str]:
    names = [f"{v} {o}" for v, objs in COMPOUND.items() for o in objs] + PLAIN
    return names[::-1]  # not in the sorted order


def make_dataset(root: Path, videos: bool = True) -> Path:
    """The official layout in miniature: database, indexing files and dev3 videos."""
    idx = root / "indexing_files"
    idx.mkdir(parents=True)
    names = class_names()
    (idx / "atomic_action_list.txt").write_text("\n".join(names) + "\n")
    (idx / "action_object_relation_list.txt").write_text("\n".join("%d %d" % pair(n) for n in names) + "\n")
    for split in ("train", "test"):
        (idx / f"{split}_cross_env.txt").write_text(
            "\n".join(s for s, (sp, _) in SCANS.items() if sp == split) + "\n")
    con = sqlite3.connect(root / "ikea_annotation_db_full")
    con.executescript("""
        CREATE TABLE videos (id INTEGER PRIMARY KEY, video_name TEXT, video_path TEXT, furniture TEXT,
                             camera TEXT, annotated INTEGER, nframes INTEGER);
        CREATE TABLE annotations (id INTEGER PRIMARY KEY, video_id INTEGER, atomic_action_id INTEGER,
                                  object_id INTEGER, starting_frame INTEGER, ending_frame INTEGER,
                                  action_description TEXT, object_name TEXT);
        CREATE TABLE atomic_actions (id INTEGER PRIMARY KEY, atomic_action TEXT);
        CREATE TABLE objects (id INTEGER PRIMARY KEY, object TEXT);
    """)
    con.executemany("INSERT INTO atomic_actions (atomic_action) VALUES (?)", [("",)] + [(v,) for v in VERBS])
    con.executemany("INSERT INTO objects (object) VALUES (?)", [("",)] + [(o,) for o in OBJECTS])
    rng = np.random.default_rng(0)
    for scan in SCANS:
        furniture, name = scan.split("/")
        for cam in ("dev1", "dev2", "dev3"):
            cur = con.execute("INSERT INTO videos (video_name, video_path, furniture, camera, annotated, nframes) "
                              "VALUES (?, ?, ?, ?, 1, ?)", (name, f"{scan}/{cam}/images", furniture, cam, NFRAMES))
            if cam != "dev3":
                continue
            for label, s, e in ANNOTATIONS[scan]:
                a, o = (aid("flip ..."), oid("leg")) if label == "flip leg" else pair(label)
                con.execute("INSERT INTO annotations (video_id, atomic_action_id, object_id, starting_frame, "
                            "ending_frame, action_description, object_name) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (cur.lastrowid, a, o, s, e, VERBS[a - 2], ([""] + OBJECTS)[o - 1]))
            if videos:
                frames = rng.integers(0, 255, (NFRAMES, 32, 32, 3), dtype=np.uint8)
                write_video(root / scan / cam / "images" / "scan_video.avi", frames, 30)
    con.commit()
    con.close()
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ikea") / "IKEA_ASM")


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_line_error(root: Path, options: ImportOptions | None = None) -> str:
    with pytest.raises(DatasetImportError) as info:
        import_ikea_asm(root, options or ImportOptions())
    message = str(info.value)
    assert "\n" not in message and message.startswith("ikea_asm: ")
    return message


def test_registered():
    fn, protocols, default, _ = IMPORTERS["ikea_asm"]
    assert fn is import_ikea_asm and protocols == ("cross_env",) and default == "cross_env"


def test_split_sizes_and_class_counts(dataset):
    result = import_ikea_asm(dataset, ImportOptions())
    assert result.protocol == "cross_env" and result.options["view"] == "dev3"
    # 33 fine-grained classes: NA first, then the list sorted, as the official loader orders them.
    fine = result.tasks["fine_action"]
    assert len(fine) == 33 and fine[0] == "NA" and fine[1:] == sorted(class_names())
    assert result.tasks["atomic_action"] == ["NA"] + sorted(["pick up", "lay down", "flip", "push"] + PLAIN)
    assert result.tasks["object_in_use"] == ["NA"] + sorted(OBJECTS + ["none"])
    for split, truth in TRUTH.items():
        got = Counter(r["fine_action"] for r in result.rows if r["split"] == split)
        assert dict(got) == truth, split
    assert len(result.rows) == 16
    train = [r for r in result.rows if r["split"] == "train"]
    assert Counter(r["atomic_action"] for r in train) == {"NA": 3, "pick up": 2, "lay down": 2, "spin leg": 1,
                                                           "tighten leg": 1, "flip": 1, "other": 1}
    assert Counter(r["object_in_use"] for r in train) == {"NA": 3, "leg": 2, "table top": 3, "none": 3}
    # Segments: end exclusive, clipped to nframes, NA filling the gaps (the left-out "flip leg" too).
    scan1 = [(r["start_frame"], r["end_frame"], r["fine_action"]) for r in result.rows
             if r["_scan"].endswith("0001_black_table_02_01_2019_08_16_14_00")]
    assert scan1 == [(0, 2, "NA"), (2, 6, "pick up leg"), (6, 8, "NA"), (8, 12, "lay down leg"),
                     (12, 18, "spin leg"), (18, 20, "NA"), (20, 24, "tighten leg")]
    assert {r["_environment"] for r in result.rows if r["split"] == "test"} == {"env2"}
    assert {r["_environment"] for r in train} == {"env1", "env3"}
    assert all(Path(r["video"]).is_absolute() and r["video"].endswith("dev3/images/scan_video.avi")
               for r in result.rows)
    notes = " ".join(result.notes)
    assert "1 annotations left out: their (atomic_action_id, object_id)" in notes
    assert "1 annotations left out: empty" in notes and "1 annotated dev3 videos are in neither" in notes
    assert "not named" not in notes  # every class is "<atomic action> <object>" or "<atomic action>"


def test_write_import_files_and_csv_loads(dataset, tmp_path):
    result = import_ikea_asm(dataset, ImportOptions())
    summary = write_import(result, tmp_path / "out")
    for name in ("annotations.csv", "labels.yaml", "pairs.yaml", "import.json"):
        assert (tmp_path / "out" / name).is_file(), name
    ds = load_annotations(tmp_path / "out" / "annotations.csv")
    assert ds.tasks == ["fine_action", "atomic_action", "object_in_use"]
    assert len(ds) == 16 and Counter(s.split for s in ds) == {"train": 11, "test": 5}
    assert all(s.end_frame is not None and s.start_frame < s.end_frame for s in ds)
    labels = yaml.safe_load((tmp_path / "out" / "labels.yaml").read_text())
    assert list(labels) == ["fine_action", "atomic_action", "object_in_use"] and len(labels["fine_action"]) == 33
    pairs = yaml.safe_load((tmp_path / "out" / "pairs.yaml").read_text())
    assert len(pairs["tasks"]["fine_action"]) == pairs["papers_count"] == 7
    info = json.loads((tmp_path / "out" / "import.json").read_text())
    assert info == json.loads(json.dumps(summary))
    assert info["splits"]["test"]["classes"]["fine_action"] == TRUTH["test"]
    assert info["classes"] == {"fine_action": 33, "atomic_action": 17, "object_in_use": 11}
    assert info["pairs"] == {"fine_action": 7}


def test_missing_annotation_files(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "a")
    (root / "ikea_annotation_db_full").unlink()
    assert "annotation database not found" in one_line_error(root)
    root = copy_dataset(dataset, tmp_path / "b")
    (root / "indexing_files" / "test_cross_env.txt").unlink()
    assert "missing" in (msg := one_line_error(root)) and "test_cross_env.txt" in msg
    root = copy_dataset(dataset, tmp_path / "c")
    (root / "indexing_files" / "atomic_action_list.txt").unlink()
    assert "atomic_action_list.txt" in one_line_error(root)


def test_renamed_column_and_unexpected_layout(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "a")
    with sqlite3.connect(root / "ikea_annotation_db_full") as con:
        con.execute("ALTER TABLE annotations RENAME COLUMN starting_frame TO start")
    msg = one_line_error(root)
    assert "table 'annotations' has no column 'starting_frame'" in msg and "ikea_annotation_db_full" in msg
    root = copy_dataset(dataset, tmp_path / "b")
    (root / "ikea_annotation_db_full").write_bytes(b"not a database" * 100)
    assert "not a readable sqlite database" in one_line_error(root)
    root = copy_dataset(dataset, tmp_path / "c")
    with sqlite3.connect(root / "ikea_annotation_db_full") as con:
        con.execute("UPDATE videos SET video_path = 'flat_scan_dev3' WHERE id = 3")
    assert "expected '<Furniture>/<scan>/dev3/images'" in one_line_error(root)
    root = copy_dataset(dataset, tmp_path / "d")
    rel = root / "indexing_files" / "action_object_relation_list.txt"
    rel.write_text("\n".join(rel.read_text().splitlines()[:-1]) + "\n")
    assert "31 lines for the 32 classes" in one_line_error(root)
    assert "unknown view 'dev4'" in one_line_error(dataset, ImportOptions(view="dev4"))


def test_listed_video_missing(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "a")
    video = root / "Kallax_Shelf_Drawer/0003_oak_floor_04_01_2019_08_21_11_00/dev3/images/scan_video.avi"
    video.unlink()
    msg = one_line_error(root)
    assert "1 listed videos are missing" in msg and str(video) in msg and "--skip-missing" in msg
    (video.parent / "000000.jpg").write_bytes(b"")  # frames only: the message says how to make the video
    assert "ffmpeg" in one_line_error(root)
    result = import_ikea_asm(root, ImportOptions(skip_missing=True))
    assert result.missing == [str(video)]
    assert not any(r["split"] == "test" for r in result.rows) and len(result.rows) == 11


def test_unknown_label(dataset, tmp_path):
    root = copy_dataset(dataset, tmp_path / "a")
    with sqlite3.connect(root / "ikea_annotation_db_full") as con:
        con.execute("UPDATE annotations SET atomic_action_id = 99 WHERE id = 1")
    msg = one_line_error(root)
    assert "atomic_action_id 99, not in table 'atomic_actions'" in msg
    root = copy_dataset(dataset, tmp_path / "b")
    with sqlite3.connect(root / "ikea_annotation_db_full") as con:
        con.execute("UPDATE annotations SET object_id = 42 WHERE id = 2")
    assert "object_id 42, not in table 'objects'" in one_line_error(root)
    root = copy_dataset(dataset, tmp_path / "c")
    rel = root / "indexing_files" / "action_object_relation_list.txt"
    rel.write_text("77 1\n" + "\n".join(rel.read_text().splitlines()[1:]) + "\n")
    assert "refers to id 77 of table 'atomic_actions'" in one_line_error(root)


def test_other_view(dataset):
    """dev1 rows carry no annotations in the fixture: every frame is NA, and dev1 videos are absent."""
    msg = one_line_error(dataset, ImportOptions(view="dev1"))
    assert "dev1/images/scan_video.avi" in msg
    result = import_ikea_asm(dataset, ImportOptions(view="dev1", skip_missing=True))
    assert result.rows == [] and len(result.missing) == 3


def test_full_path_through_the_cli(dataset, tmp_path):
    report = import_through_the_cli(import_ikea_asm(dataset, ImportOptions()), tmp_path / "import", tmp_path,
                                    extract=["--device", "cpu"],
                                    train=["--split", "train", "--device", "cpu", "--workers", "0"],
                                    evaluate=["--split", "test", "--device", "cpu", "--workers", "0"])
    assert set(report["tasks"]) == {"fine_action", "atomic_action", "object_in_use"}
