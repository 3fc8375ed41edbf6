"""Annotations users give for their own videos: a CSV file or a folder per class.

The format is documented for users in ``docs/DATA_FORMAT.md``. Errors are
:class:`AnnotationError` and name the file, the row (and line) and the column, because
annotation files are hand-written and a vague error costs a user far more than a precise one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from step_ros.data.video import VIDEO_EXTENSIONS

__all__ = [
    "AnnotationError",
    "Sample",
    "Dataset",
    "load_annotations",
    "load_csv",
    "load_folder",
    "check_labels",
    "carve_validation",
    "RESERVED_COLUMNS",
    "SPLIT_NAMES",
]

#: Columns with a fixed meaning; every other column (not starting with "_") is a task.
RESERVED_COLUMNS: tuple[str, ...] = ("video", "start_frame", "end_frame", "split", "context", "fps")
#: First-level folder names that make a folder layout ``root/<split>/<label>/...``.
SPLIT_NAMES: frozenset[str] = frozenset({"train", "val", "valid", "validation", "test"})


class AnnotationError(ValueError):
    """An annotation file or folder is malformed; the message says where."""


@dataclass(frozen=True)
class Sample:
    """One labelled video segment.

    ``end_frame`` is exclusive; ``None`` means "to the end of the video". ``origin`` says
    where the sample was declared (file and row), so later errors can point back to it.
    """

    video: Path
    labels: dict[str, str]
    start_frame: int = 0
    end_frame: int | None = None
    split: str | None = None
    context: str | None = None
    fps: float | None = None  # the video's frame rate when the CSV says so (else PyAV's is used)
    origin: str = field(default="", compare=False)


@dataclass
class Dataset:
    """A list of samples plus the task names they are labelled for (in column order)."""

    samples: list[Sample]
    tasks: list[str]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def labels(self, task: str) -> list[str]:
        """Sorted unique labels of ``task`` over all samples."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; tasks are {self.tasks}")
        return sorted({s.labels[task] for s in self.samples})

    @property
    def splits(self) -> list[str]:
        """Sorted split names present (samples without a split are not listed)."""
        return sorted({s.split for s in self.samples if s.split is not None})

    @property
    def contexts(self) -> list[str]:
        """Sorted context names present (samples without a context are not listed)."""
        return sorted({s.context for s in self.samples if s.context is not None})

    def filter(
        self,
        split: str | Iterable[str] | None = None,
        context: str | Iterable[str] | None = None,
    ) -> Dataset:
        """Samples whose split / context is the given name (or one of the given names).

        ``None`` means "any". The tasks are kept even if a label no longer occurs.
        """
        splits = _as_set(split)
        contexts = _as_set(context)
        kept = [
            s
            for s in self.samples
            if (splits is None or s.split in splits) and (contexts is None or s.context in contexts)
        ]
        return Dataset(samples=kept, tasks=list(self.tasks), source=self.source)


def _as_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {value}
    return set(value)


def _where(path: Path, row: int, line: int, column: str | None = None) -> str:
    col = f", column '{column}'" if column else ""
    return f"{path}: row {row} (line {line}){col}"


def _parse_frame(text: str, where: str) -> int | None:
    if text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise AnnotationError(f"{where}: expected an integer frame index, got {text!r}") from None
        if not as_float.is_integer():
            raise AnnotationError(f"{where}: expected an integer frame index, got {text!r}") from None
        value = int(as_float)
    if value < 0:
        raise AnnotationError(f"{where}: frame index must be >= 0, got {value}")
    return value


def load_csv(path: str | os.PathLike[str], check_files: bool = True) -> Dataset:
    """Read an annotation CSV (see docs/DATA_FORMAT.md).

    Relative ``video`` paths resolve against the CSV's folder. With ``check_files`` every
    video must exist (checked here, so a typo fails before hours of feature extraction).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    base = path.resolve().parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise AnnotationError(f"{path}: the file is empty (expected a header row)") from None
            header = [h.strip() for h in header]
            rows = [(reader.line_num, r) for r in reader]
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not a UTF-8 text CSV file ({exc})") from exc
    except csv.Error as exc:
        raise AnnotationError(f"{path}: malformed CSV ({exc})") from exc

    seen: set[str] = set()
    for i, name in enumerate(header):
        if name == "":
            raise AnnotationError(f"{path}: header column {i + 1} has no name")
        if name in seen:
            raise AnnotationError(f"{path}: column '{name}' appears twice in the header")
        seen.add(name)
    if "video" not in header:
        raise AnnotationError(f"{path}: missing required column 'video' (header is {header})")
    tasks = [h for h in header if h not in RESERVED_COLUMNS and not h.startswith("_")]
    if not tasks:
        raise AnnotationError(
            f"{path}: no task column; add at least one column holding labels "
            f"(any column other than {list(RESERVED_COLUMNS)})"
        )

    samples: list[Sample] = []
    row_no = 0
    for line, values in rows:
        if not values or all(v.strip() == "" for v in values):
            continue  # blank line
        row_no += 1
        if len(values) != len(header):
            raise AnnotationError(
                f"{_where(path, row_no, line)}: has {len(values)} fields, the header has {len(header)}"
            )
        rec = {h: v.strip() for h, v in zip(header, values)}
        video_text = rec["video"]
        if video_text == "":
            raise AnnotationError(f"{_where(path, row_no, line, 'video')}: empty video path")
        video = Path(os.path.expanduser(video_text))
        if not video.is_absolute():
            video = base / video
        if check_files and not video.is_file():
            raise AnnotationError(f"{_where(path, row_no, line, 'video')}: video file not found: {video}")
        labels: dict[str, str] = {}
        for task in tasks:
            if rec[task] == "":
                raise AnnotationError(f"{_where(path, row_no, line, task)}: empty label for task '{task}'")
            labels[task] = rec[task]
        fps_text = rec.get("fps", "")
        fps = None
        if fps_text != "":
            try:
                fps = float(fps_text)
            except ValueError:
                fps = -1.0
            if not (fps > 0 and fps < 1e4):
                raise AnnotationError(f"{_where(path, row_no, line, 'fps')}: expected the video's frame rate in "
                                      f"frames per second (a positive number), got {fps_text!r}")
        start = _parse_frame(rec.get("start_frame", ""), _where(path, row_no, line, "start_frame"))
        end = _parse_frame(rec.get("end_frame", ""), _where(path, row_no, line, "end_frame"))
        start = 0 if start is None else start
        if end is not None and start >= end:
            raise AnnotationError(
                f"{_where(path, row_no, line, 'start_frame')}: start_frame {start} must be "
                f"< end_frame {end} (end is exclusive)"
            )
        samples.append(
            Sample(
                video=video,
                labels=labels,
                start_frame=start,
                end_frame=end,
                split=rec.get("split") or None,
                context=rec.get("context") or None,
                fps=fps,
                origin=_where(path, row_no, line),
            )
        )
    if not samples:
        raise AnnotationError(f"{path}: no annotation rows after the header")
    return Dataset(samples=samples, tasks=tasks, source=path)


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folders(root: Path, task: str, split: str | None) -> list[Sample]:
    loose = sorted(p.name for p in root.iterdir() if _is_video(p))
    if loose:
        raise AnnotationError(
            f"{root}: video files directly in this folder ({loose[0]}, ...); expected one "
            f"subfolder per label: {root}/<label>/<video>"
        )
    samples: list[Sample] = []
    for label_dir in _subdirs(root):
        for video in sorted(p for p in label_dir.rglob("*") if _is_video(p)):
            samples.append(
                Sample(
                    video=video.resolve(),
                    labels={task: label_dir.name},
                    split=split,
                    origin=f"{video}",
                )
            )
    return samples


def load_folder(root: str | os.PathLike[str], task: str = "fine_action") -> Dataset:
    """Read a folder-per-class layout: ``root/<label>/*.mp4`` or ``root/<split>/<label>/*.mp4``.

    The split layout is used when every first-level folder is a split name
    (train / val / valid / validation / test). Videos may sit in nested folders below the
    label folder. The single task is named ``task``.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"annotation folder not found: {root}")
    first = _subdirs(root)
    if not first:
        raise AnnotationError(f"{root}: no label folders; expected {root}/<label>/<video>")
    if all(d.name.lower() in SPLIT_NAMES for d in first):
        samples = []
        for split_dir in first:
            samples.extend(_class_folders(split_dir, task, split_dir.name))
    else:
        samples = _class_folders(root, task, None)
    if not samples:
        raise AnnotationError(
            f"{root}: no videos found (extensions {', '.join(VIDEO_EXTENSIONS)}) in label folders"
        )
    return Dataset(samples=samples, tasks=[task], source=root)


def load_annotations(
    path: str | os.PathLike[str], task: str = "fine_action", check_files: bool = True
) -> Dataset:
    """Load a CSV annotation file or a folder-per-class tree (``task`` names the folder task)."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path, task=task)
    if path.is_file():
        return load_csv(path, check_files=check_files)
    raise AnnotationError(f"annotations not found: {path} (expected a CSV file or a folder)")


def check_labels(dataset: Dataset, task: str, allowed_labels: Iterable[str]) -> None:
    """Raise if a sample has a ``task`` label outside ``allowed_labels`` (e.g. a manifest's).

    The message names the label, the task and the first place it occurs, and how many
    samples carry it, so a typo in one row is easy to find.
    """
    if task not in dataset.tasks:
        raise AnnotationError(
            f"task '{task}' is not in the annotations {dataset.source or ''} (tasks: {dataset.tasks})"
        )
    allowed = set(allowed_labels)
    unknown: dict[str, list[Sample]] = {}
    for s in dataset.samples:
        label = s.labels[task]
        if label not in allowed:
            unknown.setdefault(label, []).append(s)
    if unknown:
        parts = []
        for label, where in sorted(unknown.items()):
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            parts.append(f"'{label}' at {where[0].origin or where[0].video}{more}")
        raise AnnotationError(
            f"unknown label(s) for task '{task}': {'; '.join(parts)}. "
            f"Allowed labels: {sorted(allowed)}"
        )



def carve_validation(dataset: Dataset, fraction: float, task: str, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` into (train, validation), ``fraction`` of each ``task`` class to validation.

    Whole videos move, never single segments: segments of one recording look alike, and a
    validation clip whose neighbour was trained on would flatter the head.  A video counts for
    the class of its first segment.  Every class with at least two videos gives at least one to
    validation and keeps at least one; the choice depends only on ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {fraction}")
    if task not in dataset.tasks:
        raise AnnotationError(f"task '{task}' is not in the annotations {dataset.source or ''} (tasks: {dataset.tasks})")
    videos: dict[Path, list[Sample]] = {}
    for s in dataset.samples:
        videos.setdefault(s.video, []).append(s)
    by_class: dict[str, list[Path]] = {}
    for video, samples in videos.items():
        by_class.setdefault(samples[0].labels[task], []).append(video)
    rng = np.random.default_rng(seed)
    held: set[Path] = set()
    for label in sorted(by_class):
        group = sorted(by_class[label], key=str)
        if len(group) < 2:
            continue
        k = min(len(group) - 1, max(1, round(fraction * len(group))))
        held.update(group[i] for i in rng.permutation(len(group))[:k])
    train = [s for s in dataset.samples if s.video not in held]
    val = [s for s in dataset.samples if s.video in held]
    if not val:
        raise ValueError(f"--val-fraction {fraction}: no class of '{task}' has two videos to split")
    return (Dataset(train, list(dataset.tasks), dataset.source), Dataset(val, list(dataset.tasks), dataset.source))
