"""Something-Something v2 (Qualcomm, formerly TwentyBN) -> the project's annotation CSV.

Layout read (docs/datasets/SSV2.md, which cites a source for every fact)::

    ROOT/
      labels/                       # or ROOT itself, ROOT/annotations/, or
        labels.json                 #   ROOT/20bn-something-something-download-package-labels/labels/
        train.json                  # older releases: something-something-v2-labels.json,
        validation.json             #   -train.json, -validation.json (both names are accepted)
      20bn-something-something-v2/  # or ROOT/videos/, or ROOT itself
        <id>.webm                   # <id>.mp4 is accepted too (converted copies)

``labels.json`` maps each of the 174 class names to its index as a string; ``train.json`` and
``validation.json`` are lists of ``{"id", "label", "template", "placeholders"}``.  An entry's class
is its ``template`` with the square brackets removed (``"Putting [something] into [something]"``
-> ``"Putting something into something"``), looked up in ``labels.json``: the rule of the public
loaders (SlowFast, mmaction2, TSM).  ``label`` is the filled-in caption and is not the class.

Protocols (one task, ``fine_action``, the 174 classes in ``labels.json`` index order):

- ``full`` (default): train = every ``train.json`` video, test = every ``validation.json`` video.
  The official test set is not used: papers and loaders report SSv2 on the validation set.
- ``lowdata``: the papers' low-data setting (``--fraction`` 0.05, 0.10 or 0.25): that share of
  EACH class of ``train.json`` (round half up, at least one video), drawn with ``--seed``; the
  full validation set is still the test set.  Per class the draw is a seeded shuffle of the ids,
  so for one seed the 5 % set lies inside the 10 % set, which lies inside the 25 % set.

No val split is written: ``step-ros train --val-fraction`` carves one from train when wanted.
Only annotation files are read and the video folder listed; nothing is decoded.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

from . import DatasetImportError, ImportOptions, ImportResult, register

__all__ = ["DATASET", "TASK", "PROTOCOLS", "PAPER_FRACTIONS", "import_ssv2", "class_of_template",
           "lowdata_count"]

DATASET = "ssv2"
TASK = "fine_action"
PROTOCOLS = ("full", "lowdata")
PAPER_FRACTIONS = (0.05, 0.10, 0.25)
NUM_CLASSES = 174

#: Where the annotation files may lie, relative to the root (first match wins).
ANNOTATION_DIRS = ("labels", "", "annotations", "20bn-something-something-download-package-labels/labels")
#: Accepted file names per annotation file: the current package's, then the older 20BN names.
ANNOTATION_NAMES = {
    "labels": ("labels.json", "something-something-v2-labels.json"),
    "train": ("train.json", "something-something-v2-train.json"),
    "validation": ("validation.json", "something-something-v2-validation.json"),
}
#: Where the videos may lie, relative to the root (the first that holds any video wins).
VIDEO_DIRS = ("20bn-something-something-v2", "20bn-something-something-v2/20bn-something-something-v2",
              "videos", "")
#: Video file extensions, in order of preference (the release is .webm; .mp4 for converted copies).
VIDEO_EXTS = (".webm", ".mp4")


def class_of_template(template: str) -> str:
    """The class name of an entry: its template with the placeholder brackets removed (loaders' rule)."""
    return template.replace("[", "").replace("]", "")


def lowdata_count(n: int, fraction: float) -> int:
    """Videos kept of a class with ``n`` training videos: ``fraction * n`` rounded half up, at least 1."""
    if n <= 0:
        return 0
    return max(1, min(n, math.floor(fraction * n + 0.5)))


def _find_annotations(root: Path) -> tuple[Path, dict[str, Path]]:
    """The folder holding labels.json and the three files' paths (either naming scheme)."""
    for sub in ANNOTATION_DIRS:
        folder = root / sub if sub else root
        labels = next((folder / n for n in ANNOTATION_NAMES["labels"] if (folder / n).is_file()), None)
        if labels is None:
            continue
        files = {"labels": labels}
        for kind in ("train", "validation"):
            path = next((folder / n for n in ANNOTATION_NAMES[kind] if (folder / n).is_file()), None)
            if path is None:
                raise DatasetImportError(
                    f"ssv2: missing annotation file {folder / ANNOTATION_NAMES[kind][0]} (or "
                    f"{ANNOTATION_NAMES[kind][1]}) next to {labels.name}: expected the Something-Something v2 "
                    f"label package (labels.json, train.json, validation.json)")
            files[kind] = path
        return folder, files
    looked = ", ".join(str((root / s) if s else root) for s in ANNOTATION_DIRS)
    raise DatasetImportError(
        f"ssv2: missing annotation file {root / 'labels' / 'labels.json'} (or something-something-v2-labels.json; "
        f"looked in {looked}): unzip the Something-Something v2 label package under --root")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetImportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetImportError(f"{path}: cannot be read ({exc})") from None


def _read_labels(path: Path) -> list[str]:
    """Class names in index order from labels.json ({name: "index"})."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise DatasetImportError(
            f"{path}: expected a JSON object mapping each class name to its index as a string "
            f"(e.g. {{\"Holding something\": \"16\"}}), got {type(data).__name__}")
    by_index: dict[int, str] = {}
    for name, index in data.items():
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise DatasetImportError(
                f"{path}: class {name!r} has index {index!r}; expected an integer index as a string "
                f"(e.g. \"16\")") from None
        if i in by_index:
            raise DatasetImportError(f"{path}: index {i} is given to both {by_index[i]!r} and {name!r}")
        by_index[i] = name
    return [by_index[i] for i in sorted(by_index)]


def _read_entries(path: Path, classes: set[str], labels_path: Path) -> list[tuple[str, str]]:
    """(video id, class name) for every entry of train.json / validation.json, in file order."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise DatasetImportError(
            f"{path}: expected a JSON list of entries {{\"id\", \"label\", \"template\", \"placeholders\"}}, "
            f"got {type(data).__name__}")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "id" not in entry or "template" not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DatasetImportError(
                f"{path}: entry {i} has no 'id' and 'template' keys (it has {keys}); expected entries "
                f"{{\"id\", \"label\", \"template\", \"placeholders\"}} (test.json has ids only: its labels are "
                f"not in it)")
        name = class_of_template(str(entry["template"]))
        if name not in classes:
            raise DatasetImportError(
                f"{path}: entry {i} (id {entry['id']}): unknown label {name!r} (template "
                f"{entry['template']!r}) is not a class of {labels_path}")
        out.append((str(entry["id"]), name))
    return out


def _video_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """The folder of the videos and its listing {id: file name} (.webm preferred over .mp4)."""
    first_existing = None
    for sub in VIDEO_DIRS:
        folder = root / sub if sub else root
        if not folder.is_dir():
            continue
        first_existing = first_existing or folder
        listing: dict[str, str] = {}
        with os.scandir(folder) as it:
            for e in it:
                stem, ext = os.path.splitext(e.name)
                ext = ext.lower()
                if ext in VIDEO_EXTS and (stem not in listing or ext == VIDEO_EXTS[0]):
                    listing[stem] = e.name
        if listing:
            return folder, listing
    return (first_existing if first_existing is not None and first_existing != root
            else root / VIDEO_DIRS[0]), {}


def _lowdata_ids(entries: list[tuple[str, str]], labels: list[str], fraction: float, seed: int) -> set[str]:
    """The ids kept of each class: a seeded shuffle of the class's ids (sorted first), the first k."""
    per_class: dict[str, list[str]] = {}
    for vid, name in entries:
        per_class.setdefault(name, []).append(vid)
    keep: set[str] = set()
    for name in labels:
        ids = sorted(per_class.get(name, []), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
        random.Random(f"ssv2-lowdata:{seed}:{name}").shuffle(ids)
        keep.update(ids[:lowdata_count(len(ids), fraction)])
    return keep


@register(DATASET, PROTOCOLS, "full",
          "Something-Something v2: 174 classes; full (train.json / validation.json as test) or lowdata --fraction")
def import_ssv2(root: Path, options: ImportOptions) -> ImportResult:
    """Read the SSv2 label package and list the video folder (see the module docstring)."""
    root = Path(root)
    protocol = options.protocol or "full"
    if protocol not in PROTOCOLS:
        raise DatasetImportError(f"ssv2: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    fraction = options.fraction
    if protocol == "full" and fraction is not None:
        raise DatasetImportError("ssv2: --fraction applies to --protocol lowdata only (the full protocol trains "
                                 "on every train.json video)")
    if protocol == "lowdata":
        if fraction is None:
            raise DatasetImportError("ssv2: --protocol lowdata needs --fraction (the papers use 0.05, 0.10, 0.25)")
        if not 0.0 < fraction < 1.0:
            raise DatasetImportError(f"ssv2: --fraction must lie between 0 and 1 (exclusive), got {fraction}")

    _, files = _find_annotations(root)
    labels = _read_labels(files["labels"])
    classes = set(labels)
    train = _read_entries(files["train"], classes, files["labels"])
    test = _read_entries(files["validation"], classes, files["labels"])

    notes = [f"annotations: {files['labels']}, {files['train'].name}, {files['validation'].name}",
             "test = the official validation set (validation.json), as in the papers and public loaders"]
    if len(labels) != NUM_CLASSES:
        notes.append(f"{files['labels']} has {len(labels)} classes (the release has {NUM_CLASSES})")
    opts: dict[str, Any] = {}
    if protocol == "lowdata":
        assert fraction is not None
        keep = _lowdata_ids(train, labels, fraction, options.seed)
        train = [(vid, name) for vid, name in train if vid in keep]
        opts = {"fraction": fraction, "seed": options.seed,
                "rounding": "per class: floor(fraction * n + 0.5), at least 1 video"}
        if not any(math.isclose(fraction, f) for f in PAPER_FRACTIONS):
            notes.append(f"fraction {fraction} is not one of the papers' {PAPER_FRACTIONS}")

    video_dir, listing = _video_folder(root)
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for split, entries in (("train", train), ("test", test)):
        for vid, name in entries:
            file = listing.get(vid)
            if file is None:
                missing.append(str(video_dir / f"{vid}{VIDEO_EXTS[0]}"))
                continue
            rows.append({"video": str(video_dir / file), "start_frame": None, "end_frame": None,
                         "split": split, "context": None, TASK: name, "_id": vid})
    if missing and not options.skip_missing:
        raise DatasetImportError(
            f"ssv2: {len(missing)} of {len(train) + len(test)} listed videos are absent from {video_dir} "
            f"(first: {missing[0]}); pass --skip-missing to leave them out")
    if missing:
        notes.append(f"{len(missing)} listed videos absent from {video_dir}, left out")
    return ImportResult(dataset=DATASET, protocol=protocol, rows=rows, tasks={TASK: labels},
                        missing=missing, notes=notes, options=opts)
