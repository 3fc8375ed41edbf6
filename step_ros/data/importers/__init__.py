"""The papers' datasets in their publishers' layouts -> the project's annotation CSV.

``step-ros import <dataset> --root DIR --out DIR [--protocol P] ...`` reads a dataset as
downloaded and writes, into ``--out``:

- ``annotations.csv``: the project's format (docs/DATA_FORMAT.md): ``video`` (absolute path),
  ``start_frame`` / ``end_frame`` for segments, one column per task, ``split`` and ``context``
  where the protocol has them;
- ``labels.yaml``: per task, the class names in the dataset's own order;
- ``pairs.yaml``: per task, the nearly symmetric pairs (shipped in ``pairs/<dataset>.yaml``,
  with the rule that made them);
- ``import.json``: what was read and written: per split and class the counts, the videos listed
  but missing, the sources of every format fact (docs/datasets/<DATASET>.md).

Each importer is a function ``(root, protocol, options) -> ImportResult`` registered in
:data:`IMPORTERS`.  Importers only read annotation files and list videos; nothing is decoded.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DatasetImportError", "ImportOptions", "ImportResult", "Importer", "IMPORTERS", "PAIRS_DIR",
           "register", "load_pairs", "write_import", "run_import"]

PAIRS_DIR = Path(__file__).resolve().parent / "pairs"
PAPERS_DIR = Path(__file__).resolve().parent / "papers"


class DatasetImportError(ValueError):
    """A dataset that cannot be imported as given; the message names the file and what was expected."""


@dataclass
class ImportOptions:
    """What a user may choose when importing (each importer documents which it reads)."""

    protocol: str | None = None  # None: the importer's default protocol
    view: str | None = None  # camera view, where the dataset has several
    fraction: float | None = None  # Something-Something v2 low-data protocol: share of each class
    seed: int = 0
    skip_missing: bool = False  # listed but absent videos: counted and left out instead of an error


@dataclass
class ImportResult:
    """One dataset read under one protocol."""

    dataset: str
    protocol: str
    rows: list[dict[str, Any]]  # video (absolute path), start_frame, end_frame, split, context, <task>: label
    tasks: dict[str, list[str]]  # task -> class names, in the dataset's order
    missing: list[str] = field(default_factory=list)  # listed videos that are absent (skip_missing)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


Importer = Callable[[Path, ImportOptions], ImportResult]

#: name -> (importer, protocols, default protocol, one-line description)
IMPORTERS: dict[str, tuple[Importer, tuple[str, ...], str, str]] = {}


def register(name: str, protocols: tuple[str, ...], default: str, description: str) -> Callable[[Importer], Importer]:
    def deco(fn: Importer) -> Importer:
        IMPORTERS[name] = (fn, protocols, default, description)
        return fn

    return deco


def load_pairs(dataset: str) -> dict[str, Any]:
    """The shipped pairs file of ``dataset``: ``{"rule": str, "papers_count": int, "tasks": {task: [[a, b], ...]}}``."""
    path = PAIRS_DIR / f"{dataset}.yaml"
    if not path.is_file():
        return {"rule": "", "tasks": {}}
    return yaml.safe_load(path.read_text()) or {"rule": "", "tasks": {}}


def check_pairs(result: ImportResult, pairs: dict[str, Any]) -> None:
    for task, plist in (pairs.get("tasks") or {}).items():
        labels = set(result.tasks.get(task, []))
        for pair in plist:
            for label in pair:
                if label not in labels:
                    raise DatasetImportError(f"pairs file {PAIRS_DIR / (result.dataset + '.yaml')}: {label!r} is not a "
                                             f"class of task {task!r} in the imported data")


def _columns(result: ImportResult) -> list[str]:
    cols = ["video", "start_frame", "end_frame"]
    cols += list(result.tasks)
    if any(r.get("split") for r in result.rows):
        cols.append("split")
    if any(r.get("context") for r in result.rows):
        cols.append("context")
    extra = sorted({k for r in result.rows for k in r if k.startswith("_")})
    return cols + extra


def write_import(result: ImportResult, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write annotations.csv, labels.yaml, pairs.yaml and import.json into ``out``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(result.dataset)
    check_pairs(result, pairs)
    cols = _columns(result)
    tmp = out / "annotations.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in result.rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in cols})
    os.replace(tmp, out / "annotations.csv")
    (out / "labels.yaml").write_text(yaml.safe_dump({t: list(v) for t, v in result.tasks.items()}, sort_keys=False))
    (out / "pairs.yaml").write_text(yaml.safe_dump(pairs, sort_keys=False))
    per_split: dict[str, Any] = {}
    for row in result.rows:
        split = row.get("split") or "none"
        entry = per_split.setdefault(split, {"rows": 0, "classes": {}})
        entry["rows"] += 1
    for task in result.tasks:
        for split in per_split:
            counts = Counter(r[task] for r in result.rows if (r.get("split") or "none") == split)
            per_split[split]["classes"][task] = dict(sorted(counts.items()))
    summary = {"dataset": result.dataset, "protocol": result.protocol, "options": result.options,
               "rows": len(result.rows), "splits": per_split,
               "classes": {t: len(v) for t, v in result.tasks.items()},
               "pairs": {t: len(p) for t, p in (pairs.get("tasks") or {}).items()},
               "missing_videos": len(result.missing), "missing": result.missing[:200], "notes": result.notes}
    (out / "import.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_import(dataset: str, root: str | os.PathLike[str], out: str | os.PathLike[str] | None,
               options: ImportOptions | None = None) -> tuple[ImportResult, dict[str, Any] | None]:
    """Import ``dataset`` from ``root`` (and write it to ``out`` when given)."""
    from . import drive_and_act, ikea_asm, ntu, ssv2  # noqa: F401 - they register themselves

    if dataset not in IMPORTERS:
        raise DatasetImportError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(IMPORTERS))}")
    fn, protocols, default, _ = IMPORTERS[dataset]
    options = options or ImportOptions()
    if options.protocol is None:
        options.protocol = default
    if options.protocol not in protocols:
        raise DatasetImportError(f"{dataset}: unknown protocol {options.protocol!r}; choose one of {', '.join(protocols)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetImportError(f"{dataset}: dataset root {root} is not a folder")
    result = fn(root.resolve(), options)
    if not result.rows:
        raise DatasetImportError(f"{dataset}: no samples found under {root} for protocol {options.protocol}")
    summary = write_import(result, out) if out is not None else None
    return result, summary


def make_manifest(import_dir: str | os.PathLike[str], base: dict[str, Any], out: str | os.PathLike[str],
                  kind: str = "step") -> Path:
    """A model manifest for an imported dataset: ``base`` (name, backbone, frames, frame_interval,
    ...) plus one head of ``kind`` per task, with the imported labels and nearly symmetric pairs."""
    from ...model.manifest import parse_manifest

    import_dir = Path(import_dir)
    labels = yaml.safe_load((import_dir / "labels.yaml").read_text())
    pairs = (yaml.safe_load((import_dir / "pairs.yaml").read_text()) or {}).get("tasks") or {}
    data = dict(base)
    data["heads"] = [{"task": task, "kind": kind, "labels": list(names),
                      **({"symmetric_pairs": [list(p) for p in pairs[task]]} if pairs.get(task) else {})}
                     for task, names in labels.items()]
    out = Path(out)
    manifest = parse_manifest(data, out.parent)  # validated now, with errors that name the field
    return manifest.save(out)


__all__ += ["make_manifest", "PAPERS_DIR"]
