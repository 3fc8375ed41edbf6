"""IKEA-ASM (Ben-Shabat et al., WACV 2021) in its publisher's layout -> the project's segments.

Layout read (the one the official action-recognition loader ``action/IKEAActionDataset.py`` of
github.com/IkeaASM/IKEA_ASM_Dataset reads; docs/datasets/IKEA_ASM.md cites every fact)::

    <root>/ikea_annotation_db_full              sqlite: tables videos, annotations, atomic_actions, objects
    <root>/indexing_files/atomic_action_list.txt            one fine-grained class name a line
    <root>/indexing_files/action_object_relation_list.txt   "<atomic_action_id> <object_id>" a line
    <root>/indexing_files/train_cross_env.txt               "<Furniture>/<scan>" a line
    <root>/indexing_files/test_cross_env.txt
    <root>/<Furniture>/<scan>/<dev1|dev2|dev3>/images/scan_video.avi   the RGB video of one view

Segments: every row of the ``annotations`` table of an annotated video of the chosen view
(``videos.camera``) whose (atomic_action_id, object_id) is a line of the relation list gives one
segment [starting_frame, min(ending_frame, nframes)) labelled with that line's class name; rows
whose pair is not in the list are left out, as the official loader leaves them out (the list keeps
only the classes with more than 20 examples). The frames no kept annotation covers are the
official loader's label 0, ``NA``: each maximal run of them becomes one ``NA`` segment, so the
fine-grained task has the papers' 33 classes (``NA`` + the 32 of the list, sorted, as the
official loader orders them).

Tasks: ``fine_action`` (the class name), ``atomic_action`` (the ``atomic_actions`` row of the
segment's atomic_action_id, without its "..." object placeholder) and ``object_in_use`` (the
``objects`` row of its object_id; ``none`` for the blank first row the relation list gives to
actions without an object slot); ``NA`` segments are ``NA`` in all three.

Protocol: ``cross_env`` (the only one): the official cross-environment split, train and test
scans from ``train_cross_env.txt`` / ``test_cross_env.txt`` (test = environments 2 and 4 of the
publisher's split script). Option ``--view dev1|dev2|dev3`` (default ``dev3``, the official
loader's default camera, the "top view").
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

from . import DatasetImportError, ImportOptions, ImportResult, register

__all__ = ["import_ikea_asm", "VIEWS", "DB_NAME", "ENVIRONMENTS"]

DATASET = "ikea_asm"
VIEWS: tuple[str, ...] = ("dev1", "dev2", "dev3")
DEFAULT_VIEW = "dev3"
DB_NAME = "ikea_annotation_db_full"
#: Where the database is looked for: the official loader's place first (the dataset root), then
#: the folders third-party code keeps the "Annotations - action" download in.
DB_CANDIDATES: tuple[str, ...] = (DB_NAME, f"action_annotations/{DB_NAME}", f"annotations/action_annotations/{DB_NAME}")
INDEX_DIR = "indexing_files"
ACTION_LIST = "atomic_action_list.txt"
RELATION_LIST = "action_object_relation_list.txt"
SPLIT_FILES: dict[str, str] = {"train": "train_cross_env.txt", "test": "test_cross_env.txt"}
VIDEO_NAME = "scan_video.avi"
NA = "NA"
NO_OBJECT = "none"
#: The publisher's environments by calibration number (toolbox/split_data_train_test_v2.py);
#: the test environments of cross_env are env2 and env4.
ENVIRONMENTS: dict[str, tuple[int, ...]] = {"env1": (1, 2), "env2": (4, 5), "env3": (6, 7), "env4": (8,),
                                            "env5": (9, 10, 11)}
#: The columns the importer reads, per table (the official loader and toolbox scripts read these).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "videos": ("id", "video_path", "camera", "annotated", "nframes"),
    "annotations": ("video_id", "atomic_action_id", "object_id", "starting_frame", "ending_frame"),
    "atomic_actions": ("atomic_action",),
    "objects": ("object",),
}


def _find_db(root: Path) -> Path:
    """The annotation database: the official place (root) or a known download folder."""
    for rel in DB_CANDIDATES:
        path = root / rel
        if path.is_file():
            return path
    raise DatasetImportError(
        f"ikea_asm: annotation database not found: expected the sqlite file {root / DB_NAME} (from the "
        f"'Annotations - action' download; also looked in {', '.join(DB_CANDIDATES[1:])})")


def _read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of an indexing file; a missing file is one clear line."""
    if not path.is_file():
        raise DatasetImportError(f"ikea_asm: missing {path}: expected {what} (the dataset's indexing_files/ folder)")
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def _connect(db: Path) -> sqlite3.Connection:
    """Read-only, so that importing never changes the user's database."""
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        con.row_factory = sqlite3.Row
        con.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError as exc:
        raise DatasetImportError(f"ikea_asm: {db}: not a readable sqlite database ({exc}); expected the "
                                 f"'{DB_NAME}' file of the IKEA-ASM action annotations") from exc
    return con


def _check_schema(con: sqlite3.Connection, db: Path) -> None:
    """Every table and column the importer reads is there, or one line says which is not."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table, cols in REQUIRED_COLUMNS.items():
        if table not in tables:
            found = ", ".join(sorted(tables)) or "none"
            raise DatasetImportError(f"ikea_asm: {db}: no table '{table}' (tables: {found}); "
                                     f"expected the IKEA-ASM annotation database")
        have = [r[1] for r in con.execute(f"PRAGMA table_info('{table}')")]
        for col in cols:
            if col not in have:
                raise DatasetImportError(f"ikea_asm: {db}: table '{table}' has no column '{col}' (columns: "
                                         f"{', '.join(have)}); expected {', '.join(cols)}")


def _id_table(con: sqlite3.Connection, table: str, column: str) -> dict[int, str]:
    """id -> text of a lookup table. The toolbox numbers rows from 1 in table order
    (run_statistics_and_generate_class_list.py); an ``id`` column, when present, is used instead."""
    have = [r[1] for r in con.execute(f"PRAGMA table_info('{table}')")]
    rows = con.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    out: dict[int, str] = {}
    for pos, row in enumerate(rows, start=1):
        key = int(row["id"]) if "id" in have and row["id"] is not None else pos
        out[key] = (row[column] or "").strip()
    return out


def _class_list(index: Path) -> list[tuple[str, tuple[int, int]]]:
    """(class name, (atomic_action_id, object_id)) pairs sorted by name, as the official loader sorts them."""
    names = _read_lines(index / ACTION_LIST, "the fine-grained action class list, one name a line")
    rel_path = index / RELATION_LIST
    rel_lines = _read_lines(rel_path, "one '<atomic_action_id> <object_id>' line per class of " + ACTION_LIST)
    if len(names) != len(rel_lines):
        raise DatasetImportError(f"ikea_asm: {rel_path}: {len(rel_lines)} lines for the {len(names)} classes of "
                                 f"{ACTION_LIST}; expected one '<atomic_action_id> <object_id>' line per class")
    pairs: list[tuple[int, int]] = []
    for n, line in enumerate(rel_lines, start=1):
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise DatasetImportError(f"ikea_asm: {rel_path}: line {n} is {line!r}; expected two integers "
                                     f"'<atomic_action_id> <object_id>'")
        pairs.append((int(parts[0]), int(parts[1])))
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise DatasetImportError(f"ikea_asm: {index / ACTION_LIST}: class {dup!r} is listed twice; "
                                 f"expected unique names")
    if NA in names:
        raise DatasetImportError(f"ikea_asm: {index / ACTION_LIST}: lists {NA!r}, the label of unannotated frames; "
                                 f"expected only annotated classes")
    if len(set(pairs)) != len(pairs):
        dup_pair = next(p for p in pairs if pairs.count(p) > 1)
        raise DatasetImportError(f"ikea_asm: {rel_path}: pair {dup_pair[0]} {dup_pair[1]} is listed twice; expected "
                                 f"one class per (atomic_action_id, object_id)")
    return sorted(zip(names, pairs))


def _verb(text: str) -> str:
    """An atomic action without the "..." placeholder the toolbox fills with an object name."""
    return re.sub(r"\s*\.\.\.\s*$", "", text).strip()


def _object(text: str) -> str:
    """An object name; the blank first row of ``objects`` (the toolbox's "first object is blank",
    the object of actions without an object slot) is ``none``, and so is a literal "NA" there."""
    return NO_OBJECT if text.strip().upper() in ("", NA) else text.strip()


def _environment(scan: str) -> str | None:
    """env1..env5 from the calibration number, the 4th '_' field of a scan name
    (toolbox/split_data_train_test_v2.py: person_color_config_calibration_room_date...)."""
    parts = scan.split("_")
    if len(parts) < 5 or not parts[3].isdigit():
        return None
    cal = int(parts[3])
    return next((env for env, cals in ENVIRONMENTS.items() if cal in cals), None)


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _gaps(covered: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The runs of frames in [0, n) that no interval covers: the official loader's NA frames."""
    out, pos = [], 0
    for s, e in _merge(covered):
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < n:
        out.append((pos, n))
    return out


def _missing_message(missing: list[tuple[str, Path]]) -> str:
    """One line: how many videos are absent, the first, and (frames only) how to make it."""
    scan, path = missing[0]
    frames = path.parent / "000000.jpg"
    msg = (f"ikea_asm: {len(missing)} listed videos are missing, the first {path} (scan {scan}); expected the RGB "
           f"video '{VIDEO_NAME}' of each scan (the 'Data - RGB' downloads)")
    if frames.is_file():
        msg += (f"; its folder holds extracted frames instead: make the video with "
                f"`ffmpeg -framerate 30 -i {path.parent}/%06d.jpg -c:v libx264 -pix_fmt yuv420p {path}`")
    return msg + "; or pass --skip-missing to leave them out"


@register(DATASET, ("cross_env",), "cross_env",
          "IKEA-ASM furniture assembly: 33 fine-grained actions (NA + 32), atomic action, object; "
          "cross-environment split")
def import_ikea_asm(root: Path, options: ImportOptions) -> ImportResult:
    """Read the annotation database, the class and split lists, and list (never decode) the videos."""
    root = Path(root)
    protocol = options.protocol or "cross_env"
    if protocol != "cross_env":
        raise DatasetImportError(f"ikea_asm: unknown protocol {protocol!r}; the only one is cross_env")
    view = options.view or DEFAULT_VIEW
    if view not in VIEWS:
        raise DatasetImportError(f"ikea_asm: unknown view {view!r}; choose one of {', '.join(VIEWS)} "
                                 f"(dev3, the default, is the official loader's camera)")
    index = root / INDEX_DIR
    classes = _class_list(index)
    split_of: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        for scan in _read_lines(index / name, f"the {split} scans of the cross-environment split, "
                                              f"one '<Furniture>/<scan>' a line"):
            scan = scan.strip("/")
            if split_of.get(scan, split) != split:
                raise DatasetImportError(f"ikea_asm: {index / name}: scan {scan} is in both train and test lists; "
                                         f"expected disjoint splits")
            split_of[scan] = split

    db = _find_db(root)
    con = _connect(db)
    try:
        _check_schema(con, db)
        verbs = _id_table(con, "atomic_actions", "atomic_action")
        objects = _id_table(con, "objects", "object")
        for name, (aid, oid) in classes:
            if aid not in verbs or oid not in objects:
                table, key = ("atomic_actions", aid) if aid not in verbs else ("objects", oid)
                raise DatasetImportError(f"ikea_asm: {index / RELATION_LIST}: class {name!r} refers to id {key} of "
                                         f"table '{table}', which {db} does not have; expected the list and the "
                                         f"database of the same release")
        videos = con.execute("SELECT * FROM videos WHERE annotated = 1 AND camera = ? ORDER BY video_path",
                             (view,)).fetchall()
        annotations: dict[int, list[sqlite3.Row]] = {}
        for row in con.execute("SELECT * FROM annotations ORDER BY video_id, starting_frame, ending_frame"):
            annotations.setdefault(int(row["video_id"]), []).append(row)
    finally:
        con.close()

    by_pair = {pair: name for name, pair in classes}
    fine = [NA] + [name for name, _ in classes]
    verb_of = {name: _verb(verbs[aid]) for name, (aid, _) in classes}
    object_of = {name: _object(objects[oid]) for name, (_, oid) in classes}
    atomic = [NA] + sorted(set(verb_of.values()))
    objs = [NA] + sorted(set(object_of.values()))
    # A verb that is empty or collides with NA would silently merge classes.
    for name in fine[1:]:
        if not verb_of[name] or verb_of[name] == NA:
            raise DatasetImportError(f"ikea_asm: {db}: class {name!r} has atomic action {verb_of[name]!r} (table "
                                     f"'atomic_actions'); expected a non-empty name other than {NA!r}")

    rows: list[dict[str, Any]] = []
    missing: list[tuple[str, Path]] = []
    seen: set[str] = set()
    skipped_pairs = empty = outside = 0
    for video in videos:
        vpath = str(video["video_path"]).strip().strip("/")
        parts = vpath.split("/")
        if len(parts) < 3 or parts[2] != view:
            raise DatasetImportError(f"ikea_asm: {db}: videos row id {video['id']} has video_path {vpath!r}; "
                                     f"expected '<Furniture>/<scan>/{view}/images'")
        scan = "/".join(parts[:2])
        split = split_of.get(scan)
        if split is None:
            outside += 1  # annotated but in neither list (the official loader skips it too)
            continue
        seen.add(scan)
        n = int(video["nframes"] or 0)
        segments: list[tuple[int, int, str]] = []
        for ann in annotations.get(int(video["id"]), []):
            aid, oid = int(ann["atomic_action_id"]), int(ann["object_id"])
            if aid not in verbs:
                raise DatasetImportError(f"ikea_asm: {db}: annotation of video {vpath} (frames {ann['starting_frame']}-"
                                         f"{ann['ending_frame']}) has atomic_action_id {aid}, not in table "
                                         f"'atomic_actions'; expected one of its ids")
            if oid not in objects:
                raise DatasetImportError(f"ikea_asm: {db}: annotation of video {vpath} (frames {ann['starting_frame']}-"
                                         f"{ann['ending_frame']}) has object_id {oid}, not in table 'objects'; "
                                         f"expected one of its ids")
            name = by_pair.get((aid, oid))
            if name is None:
                skipped_pairs += 1
                continue
            start, end = max(0, int(ann["starting_frame"])), min(int(ann["ending_frame"]), n)
            if start >= end:
                empty += 1
                continue
            segments.append((start, end, name))
        segments += [(s, e, NA) for s, e in _gaps([(s, e) for s, e, _ in segments], n)]
        if not segments:
            continue
        path = root / vpath / VIDEO_NAME
        if not path.is_file():
            missing.append((scan, path))
            if options.skip_missing:
                continue
        env = _environment(parts[1])
        for start, end, name in sorted(segments):
            rows.append({"video": str(path), "start_frame": start, "end_frame": end, "split": split, "context": None,
                         "fine_action": name,
                         "atomic_action": NA if name == NA else verb_of[name],
                         "object_in_use": NA if name == NA else object_of[name],
                         "_scan": scan, "_furniture": parts[0], "_environment": env})
    if missing and not options.skip_missing:
        raise DatasetImportError(_missing_message(missing))

    notes = [f"view {view}; {len(seen)} of {len(split_of)} listed scans have an annotated {view} video in {db.name}",
             "format facts and their sources: docs/datasets/IKEA_ASM.md"]
    odd = [n for n in fine[1:] if n not in (verb_of[n], f"{verb_of[n]} {object_of[n]}")]
    if odd:  # the toolbox builds each name as "<atomic action> <object>"; say so when this release does not
        notes.append(f"{len(odd)} classes are not named '<atomic action> <object>' from the database's tables "
                     f"(first: {odd[0]!r} -> {verb_of[odd[0]]!r} + {object_of[odd[0]]!r}); check the atomic_action "
                     f"and object_in_use columns")
    if skipped_pairs:
        notes.append(f"{skipped_pairs} annotations left out: their (atomic_action_id, object_id) is not a class of "
                     f"{ACTION_LIST} (the official loader leaves them out too; their frames count as NA)")
    if empty:
        notes.append(f"{empty} annotations left out: empty after clipping to the video's nframes")
    if outside:
        notes.append(f"{outside} annotated {view} videos are in neither split list and were left out")
    if missing:
        notes.append(f"{len(missing)} listed videos missing and left out (--skip-missing)")
    return ImportResult(dataset=DATASET, protocol=protocol, rows=rows,
                        tasks={"fine_action": fine, "atomic_action": atomic, "object_in_use": objs},
                        missing=[str(p) for _, p in missing], notes=notes,
                        options={"view": view, "skip_missing": options.skip_missing, "database": str(db)})
