"""Drive&Act (Martin et al., ICCV 2019; KIT / Fraunhofer IOSB, https://driveandact.com) -> annotation CSV.

Layout read (``--root`` is the folder the downloads were unpacked into; sources of every fact
in docs/datasets/DRIVE_AND_ACT.md):

- ``<root>/activities_3s/<view>/midlevel.chunks_90.split_<k>.<train|val|test>.csv``: the
  mid-level (fine-grained) activity annotations from ``iccv_activities_3s.zip``, one file per
  view, split ``k`` in 0, 1, 2 and subset.  ``<root>/iccv_activities_3s/activities_3s/...`` (the
  archive unpacked into a folder of its own name) is accepted too.  Columns:
  ``participant_id, file_id, annotation_id, frame_start, frame_end, activity, chunk_id``; every
  row is one chunk (at most 3 s, "chunks_90") of one annotated activity.
- ``<root>/<view>/<file_id>.mp4``: the videos of that view, e.g.
  ``kinect_color/vp1/run1b_2018-05-29-14-02-47.kinect_color.mp4`` (``file_id`` is
  ``vp<participant>/<run>.<stream>``).

``frame_end`` is taken as exclusive and written unchanged: in the published files the chunks of
one annotation are contiguous, each chunk's ``frame_end`` being the next chunk's
``frame_start``; the publisher does not state it (docs/datasets/DRIVE_AND_ACT.md).

Protocols: ``split0`` (default), ``split1``, ``split2``: the publisher's three splits by
participant (10 train, 2 val, 3 test), each with its train, val and test rows; the papers train
one model per split and average the three test accuracies.  Task: ``fine_action``, the 34
mid-level activities.  Option ``--view`` picks the camera (default ``kinect_color``, the only
RGB stream, which the papers use).  Nothing is decoded; videos are only looked up.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from . import DatasetImportError, ImportOptions, ImportResult, register

DATASET = "drive_and_act"
TASK = "fine_action"
PROTOCOLS = ("split0", "split1", "split2")
DEFAULT_PROTOCOL = "split0"
SUBSETS = ("train", "val", "test")
#: the papers use RGB only; kinect_color is the dataset's one RGB stream
DEFAULT_VIEW = "kinect_color"
#: views that have a folder under activities_3s/ in public loaders (not all are needed)
KNOWN_VIEWS = ("kinect_color", "kinect_ir", "kinect_depth", "inner_mirror", "a_column_co_driver",
               "a_column_driver", "ceiling", "steering_wheel")
COLUMNS = ("participant_id", "file_id", "annotation_id", "frame_start", "frame_end", "activity", "chunk_id")
VIDEO_SUFFIX = ".mp4"

#: the 34 mid-level activities, alphabetical (the order of Simael/zs-drive_and_act attributes/classes.txt)
CLASSES = (
    "closing_bottle", "closing_door_inside", "closing_door_outside", "closing_laptop", "drinking", "eating",
    "entering_car", "exiting_car", "fastening_seat_belt", "fetching_an_object", "interacting_with_phone",
    "looking_or_moving_around (e.g. searching)", "opening_backpack", "opening_bottle", "opening_door_inside",
    "opening_door_outside", "opening_laptop", "placing_an_object", "preparing_food", "pressing_automation_button",
    "putting_laptop_into_backpack", "putting_on_jacket", "putting_on_sunglasses", "reading_magazine",
    "reading_newspaper", "sitting_still", "taking_laptop_from_backpack", "taking_off_jacket", "taking_off_sunglasses",
    "talking_on_phone", "unfastening_seat_belt", "using_multimedia_display", "working_on_laptop", "writing",
)


def annotation_root(root: Path) -> Path:
    """The ``activities_3s`` folder: directly under the root, or inside ``iccv_activities_3s/``."""
    for candidate in (root / "activities_3s", root / "iccv_activities_3s" / "activities_3s"):
        if candidate.is_dir():
            return candidate
    raise DatasetImportError(
        f"{root}: no activities_3s/ folder (expected {root / 'activities_3s'}/<view>/midlevel.chunks_90.split_<k>."
        f"<train|val|test>.csv, unpacked from iccv_activities_3s.zip)")


def annotation_file(view_dir: Path, split: int, subset: str) -> Path:
    """Where the publisher puts the mid-level annotations of one split and subset."""
    return view_dir / f"midlevel.chunks_90.split_{split}.{subset}.csv"


def _int(path: Path, line: int, column: str, value: str | None) -> int:
    try:
        return int(float((value or "").strip()))
    except ValueError:
        raise DatasetImportError(f"{path}: line {line}, column {column!r}: expected an integer, got {value!r}") from None


def _read_subset(path: Path, subset: str, root: Path, view: str,
                 known: set[str]) -> tuple[list[dict[str, Any]], int]:
    """Rows of one annotation file; the second value counts chunks of zero length left out."""
    if not path.is_file():
        raise DatasetImportError(f"{path}: annotation file missing (expected the publisher's mid-level split file "
                                 f"{path.name} from iccv_activities_3s.zip)")
    rows: list[dict[str, Any]] = []
    empty = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        absent = [c for c in COLUMNS if c not in header]
        if absent:
            raise DatasetImportError(f"{path}: expected columns {', '.join(COLUMNS)}; missing {', '.join(absent)} "
                                     f"(header: {', '.join(header) or 'empty'})")
        for line, rec in enumerate(reader, start=2):
            if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                continue  # blank line
            label = (rec["activity"] or "").strip()
            if label not in known:
                raise DatasetImportError(f"{path}: line {line}: unknown activity {label!r} (expected one of the 34 "
                                         f"Drive&Act mid-level activities, e.g. {CLASSES[0]!r})")
            file_id = (rec["file_id"] or "").strip().strip("/")
            if not file_id or ".." in Path(file_id).parts:
                raise DatasetImportError(f"{path}: line {line}: file_id {rec['file_id']!r} is not a relative path "
                                         f"like vp1/run1b_2018-05-29-14-02-47.{view}")
            start = _int(path, line, "frame_start", rec["frame_start"])
            end = _int(path, line, "frame_end", rec["frame_end"])
            if start < 0:
                raise DatasetImportError(f"{path}: line {line}: frame_start {start} is negative")
            if end <= start:
                empty += 1  # a chunk with no frame (end is exclusive): nothing to learn from
                continue
            rows.append({
                "video": str(root / view / (file_id + VIDEO_SUFFIX)),
                "start_frame": start,
                "end_frame": end,
                "split": subset,
                "context": None,
                TASK: label,
                "_subject": _int(path, line, "participant_id", rec["participant_id"]),
                "_file_id": file_id,
                "_annotation_id": _int(path, line, "annotation_id", rec["annotation_id"]),
                "_chunk_id": _int(path, line, "chunk_id", rec["chunk_id"]),
            })
    return rows, empty


@register(DATASET, PROTOCOLS, DEFAULT_PROTOCOL,
          "Drive&Act: 34 mid-level driver activities in 3 s chunks, splits 0-2 by participant, one camera view")
def import_drive_and_act(root: Path, options: ImportOptions) -> ImportResult:
    """Read one split (train, val and test rows) of one view; videos are checked for existence only."""
    root = Path(root).resolve()
    protocol = options.protocol or DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        raise DatasetImportError(f"{DATASET}: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    split = int(protocol.removeprefix("split"))
    view = options.view or DEFAULT_VIEW
    ann_root = annotation_root(root)
    view_dir = ann_root / view
    if not view_dir.is_dir():
        found = sorted(p.name for p in ann_root.iterdir() if p.is_dir())
        raise DatasetImportError(f"{view_dir}: no annotations for view {view!r} (views here: "
                                 f"{', '.join(found) or 'none'}; views public loaders name: {', '.join(KNOWN_VIEWS)})")

    rows: list[dict[str, Any]] = []
    empty = 0
    known = set(CLASSES)
    for subset in SUBSETS:
        subset_rows, subset_empty = _read_subset(annotation_file(view_dir, split, subset), subset, root, view, known)
        rows += subset_rows
        empty += subset_empty

    notes = [f"annotations: {view_dir}/midlevel.chunks_90.split_{split}.{{train,val,test}}.csv; videos: "
             f"{root / view}/<file_id>{VIDEO_SUFFIX}",
             "frame_end taken as exclusive (chunks of one annotation are contiguous: end of one = start of the next)"]
    if empty:
        notes.append(f"left out {empty} chunks with frame_end <= frame_start")
    subjects: dict[int, set[str]] = {}
    for row in rows:
        subjects.setdefault(row["_subject"], set()).add(row["split"])
    shared = sorted(s for s, subsets in subjects.items() if len(subsets) > 1)
    if shared:
        notes.append(f"participants in more than one subset (the publisher splits by participant): {shared}")

    videos = list(dict.fromkeys(row["video"] for row in rows))
    missing = [v for v in videos if not Path(v).is_file()]
    if missing and not options.skip_missing:
        raise DatasetImportError(f"{DATASET}: {len(missing)} of {len(videos)} videos listed in {view_dir} are missing, "
                                 f"first {missing[0]} (expected <root>/{view}/<file_id>{VIDEO_SUFFIX}; "
                                 f"--skip-missing leaves them out)")
    if missing:
        gone = set(missing)
        rows = [row for row in rows if row["video"] not in gone]
        notes.append(f"left out the rows of {len(missing)} missing videos (--skip-missing)")

    counts = Counter(row["split"] for row in rows)
    notes.append("rows per subset: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SUBSETS))
    return ImportResult(dataset=DATASET, protocol=protocol, rows=rows, tasks={TASK: list(CLASSES)}, missing=missing,
                        notes=notes, options={"view": view, "split": split, "skip_missing": options.skip_missing,
                                              "annotations": str(view_dir)})
