"""Ground truth for a bag, from wherever a robot team keeps it: labelled time intervals per task.

Sources (docs/BAGS.md, "Ground truth sources"):

- the project's own ``/ground_truth`` topic (``step_ros/msg/HumanAction`` per segment, written by
  ``step-ros record``), with ``/ground_truth/segment`` JSON for contexts;
- a **label topic**: each message (``std_msgs/String`` or any type with a string field named by
  path) starts an action of one task, lasting until the next message, an end marker, or the end
  of the bag.  Stamp: ``header.stamp`` when the type has a header (and it is set), else the log
  time.  A repeat of the current label continues it (label topics often publish the state
  periodically);
- an **annotation file**: CSV or JSON intervals ``start, end, <task columns>`` (in seconds from
  the first image, or in bag time), or an ELAN ``.eaf`` export (one tier per task).

Everything becomes :class:`Interval` s: one label of one task over bag time.  Intervals of an
annotation or a label topic are half-open ``[start, end)`` (one action ends where the next
starts); a ``/ground_truth`` segment is closed, ending at its last frame's stamp.  Time not
covered by any interval of a task is unlabelled: neither right nor wrong.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..model.manifest import Manifest
from .common import (
    GROUND_TRUTH_TOPIC,
    HUMAN_ACTION_TYPE,
    SEGMENT_TOPIC,
    STRING_TYPE,
    BagError,
    BagReader,
    ns_to_seconds,
    time_to_ns,
    time_to_seconds,
)

log = logging.getLogger(__name__)

__all__ = ["Interval", "Truth", "TruthError", "TruthSources", "ANNOTATION_SUFFIXES", "OUTSIDE_TOLERANCE_S", "TIME_BASES",
           "from_project_topic", "from_label_topic", "from_annotation_file", "parse_mapping"]

#: Stamps are compared after a float conversion of integer nanoseconds; allow for rounding.
EPS = 1e-6
#: How far an annotated interval may reach past the bag's first / last message (s).
OUTSIDE_TOLERANCE_S = 1.0
#: ``relative``: seconds from the first image of the replayed topic; ``bag``: bag time (s since the epoch).
TIME_BASES = ("relative", "bag")
ANNOTATION_SUFFIXES = (".csv", ".json", ".eaf")
_RESERVED_COLUMNS = {"start", "end", "context"}


@dataclass
class TruthSources:
    """Where a bag's ground truth comes from (``replay-eval``'s ``--truth-*`` options; docs/BAGS.md).

    ``topics``: ``TOPIC`` or ``TOPIC=TASK`` each: a HumanAction topic is the project's format
    (every task), any other type a label topic of one task, read from ``label_field`` and ended by
    ``end_markers``.  Nothing named: ``/ground_truth`` when the bag has it.  ``annotations``: a
    ``.csv`` / ``.json`` / ELAN ``.eaf`` file, its times ``annotation_time`` (``relative`` to the
    first image, or ``bag`` time), its columns / tiers renamed by ``task_map``.  Then every label
    is renamed by ``label_map`` and ``ignore_labels`` become unlabelled time.
    """

    topics: list[str] = field(default_factory=list)
    label_field: str = "data"
    end_markers: tuple[str, ...] = ("",)
    annotations: str | Path | None = None
    annotation_time: str = "relative"
    task_map: Mapping[str, str] | list[str] | None = None
    label_map: Mapping[str, str] | list[str] | None = None
    ignore_labels: tuple[str, ...] | list[str] = ()

    def __post_init__(self) -> None:
        if self.annotation_time not in TIME_BASES:
            raise TruthError(f"annotation time base must be one of {', '.join(TIME_BASES)}, got {self.annotation_time!r}")


class TruthError(ValueError):
    """Ground truth that cannot be used as given; the message names the file or topic and the row."""


@dataclass
class Interval:
    """One label of one task over bag time (s)."""

    task: str
    label: str
    start: float
    end: float
    closed: bool = False  # end inclusive (a /ground_truth segment ends at its last frame)
    context: str | None = None
    source: str = ""  # where it came from, for messages: "ann.csv row 4", "/labels at 12.3 s"
    meta: dict[str, Any] = field(default_factory=dict)  # /ground_truth/segment provenance

    def contains(self, t: float) -> bool:
        if t < self.start - EPS:
            return False
        return t <= self.end + EPS if self.closed else t < self.end - EPS

    def holds(self, window_start: float, stamp: float) -> bool:
        """True if the whole window ``[window_start, stamp]`` lies inside."""
        return self.contains(window_start) and self.contains(stamp)


class Truth:
    """Intervals per task, with lookups by time (the latest-starting interval wins)."""

    def __init__(self, intervals: Iterable[Interval], sources: Iterable[str] = ()) -> None:
        self.by_task: dict[str, list[Interval]] = {}
        for iv in sorted(intervals, key=lambda i: (i.start, i.end)):
            self.by_task.setdefault(iv.task, []).append(iv)
        self.sources = list(sources)
        self._starts = {t: [i.start for i in ivs] for t, ivs in self.by_task.items()}
        self._max_end = {t: np.maximum.accumulate([i.end for i in ivs]) for t, ivs in self.by_task.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.by_task)

    @property
    def contexts(self) -> list[str]:
        return sorted({i.context for ivs in self.by_task.values() for i in ivs if i.context is not None})

    def __bool__(self) -> bool:
        return bool(self.by_task)

    def _candidates(self, task: str, t: float) -> Iterable[Interval]:
        ivs = self.by_task.get(task)
        if not ivs:
            return
        i = bisect.bisect_right(self._starts[task], t + EPS) - 1
        while i >= 0 and self._max_end[task][i] + EPS >= t:
            yield ivs[i]
            i -= 1

    def at(self, task: str, t: float) -> Interval | None:
        """The interval of ``task`` that holds time ``t`` (what the person does then)."""
        return next((iv for iv in self._candidates(task, t) if iv.contains(t)), None)

    def window(self, task: str, window_start: float, stamp: float) -> Interval | None:
        """The interval of ``task`` holding the whole window, if one does (else the window straddles)."""
        return next((iv for iv in self._candidates(task, stamp) if iv.holds(window_start, stamp)), None)

    def check(self, manifest: Manifest, bag_start: float | None = None, bag_end: float | None = None) -> None:
        """Labels known to the manifest, no overlap within a task, nothing outside the bag.

        Only intervals from annotation files and label topics are checked for overlap and range
        (``/ground_truth`` segments are written by ``record``, hand-made ones may overlap).
        """
        specs = {h.task: h for h in manifest.heads}
        for task, ivs in self.by_task.items():
            spec = specs.get(task)
            for iv in ivs:
                if spec is not None and not iv.closed and iv.label not in spec.labels:
                    shown = ", ".join(spec.labels[:12]) + (", ..." if len(spec.labels) > 12 else "")
                    raise TruthError(f"{iv.source}: label {iv.label!r} of task {task!r} is not in the manifest "
                                     f"({shown}); rename it with --label-map {iv.label}=LABEL, or treat it "
                                     f"as unlabelled time with --ignore-label {iv.label}")
            checked = [iv for iv in ivs if not iv.closed]
            for a, b in zip(checked, checked[1:]):
                if b.start < a.end - EPS:
                    raise TruthError(f"{b.source}: interval [{b.start:.3f}, {b.end:.3f}) of task {task!r} overlaps "
                                     f"{a.source} [{a.start:.3f}, {a.end:.3f}); one task has one label at a time")
            if bag_start is None or bag_end is None:
                continue
            for iv in checked:
                if iv.meta.get("from_topic"):
                    continue
                lo, hi = bag_start - OUTSIDE_TOLERANCE_S, bag_end + OUTSIDE_TOLERANCE_S
                if iv.start < lo or iv.end > hi:
                    raise TruthError(
                        f"{iv.source}: interval [{iv.start:.3f}, {iv.end:.3f}] s of task {task!r} falls outside the "
                        f"bag, which spans [{bag_start:.3f}, {bag_end:.3f}] s (bag time); wrong time base? "
                        f"--annotation-time relative counts seconds from the first image, bag uses bag time")


# --------------------------------------------------------------------------- helpers


def parse_mapping(items: Iterable[str] | Mapping[str, str] | None, what: str) -> dict[str, str]:
    """``["a=b", ...]`` (CLI) or a dict -> ``{a: b}``."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key or not value:
            raise TruthError(f"{what} {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def _stamp_of(msg: Any, log_ns: int) -> float:
    """``header.stamp`` of a stamped message when set, else the bag's log time."""
    hdr = getattr(msg, "header", None)
    stamp = getattr(hdr, "stamp", None)
    if stamp is not None and hasattr(stamp, "sec") and time_to_ns(stamp) > 0:
        return time_to_seconds(stamp)
    return ns_to_seconds(log_ns)


def _field(msg: Any, path: str) -> Any:
    value = msg
    for part in path.split("."):
        if not hasattr(value, part):
            raise AttributeError(part)
        value = getattr(value, part)
    return value


def _string_fields(msg: Any, prefix: str = "", depth: int = 2) -> list[str]:
    out = []
    for name in getattr(msg, "__dataclass_fields__", {}):
        value = getattr(msg, name)
        if isinstance(value, str):
            out.append(prefix + name)
        elif depth > 1 and hasattr(value, "__dataclass_fields__"):
            out += _string_fields(value, f"{prefix}{name}.", depth - 1)
    return out


# --------------------------------------------------------------------------- sources


def from_project_topic(reader: BagReader, topic: str = GROUND_TRUTH_TOPIC,
                       segment_topic: str = SEGMENT_TOPIC) -> list[Interval]:
    """Intervals of the project's ``/ground_truth`` (one HumanAction per segment, every task)."""
    msgs: list[Any] = []
    info: dict[int, dict] = {}
    conns = [c for c in reader.connections
             if c.topic == topic or (c.topic == segment_topic and c.msgtype == STRING_TYPE)]
    for conn, _, msg in reader.decoded(conns):
        if conn.topic == segment_topic:
            try:
                d = json.loads(msg.data)
                info[int(d["segment"])] = d
            except (ValueError, KeyError, TypeError):
                log.warning("bag %s, topic %s: ignoring a message that is not segment JSON", reader.path, segment_topic)
        else:
            msgs.append(msg)
    out = []
    for m in msgs:
        d = info.get(int(m.sequence), {})
        meta = {"segment": int(m.sequence), **{k: d[k] for k in ("video", "start_frame", "fps", "split") if k in d}}
        for tp in m.tasks:
            if tp.label:
                out.append(Interval(tp.task, str(tp.label), time_to_seconds(m.window_start),
                                    time_to_seconds(m.header.stamp), closed=True, context=d.get("context"),
                                    source=f"{topic} segment {int(m.sequence)}", meta=meta))
    return out


def from_label_topic(reader: BagReader, topic: str, task: str, field_path: str = "data",
                     end_markers: Iterable[str] = ("",)) -> list[Interval]:
    """Intervals of a label topic: each message starts ``task``'s action named by ``field_path``."""
    conns = [c for c in reader.connections if c.topic == topic]
    if not conns:
        raise BagError(f"bag {reader.path} has no topic {topic!r}; its topics: {', '.join(sorted(reader.topics))}")
    markers = {m.strip() for m in end_markers}
    events: list[tuple[float, str]] = []
    for conn, log_ns, msg in reader.decoded(conns):
        try:
            value = _field(msg, field_path)
        except AttributeError:
            value = None
        if not isinstance(value, str):
            fields = ", ".join(_string_fields(msg)) or "none"
            raise TruthError(f"topic {topic} ({conn.msgtype}) has no string field {field_path!r}; choose one with "
                             f"--truth-field (its string fields: {fields})")
        events.append((_stamp_of(msg, log_ns), value.strip()))
    events.sort(key=lambda e: e[0])
    out: list[Interval] = []
    current: Interval | None = None
    for t, value in events:
        if current is not None and value == current.label:
            continue  # a repeat continues the action
        if current is not None:
            current.end = t
            out.append(current)
            current = None
        if value not in markers:
            current = Interval(task, value, t, math.inf, source=f"{topic} at t={t:.3f}", meta={"from_topic": True})
    if current is not None:
        out.append(current)  # lasts until the end of the bag
    if not events:
        log.warning("bag %s: label topic %s has no messages", reader.path, topic)
    return out


def from_annotation_file(path: str | Path, tasks: Iterable[str], t0: float, time_base: str = "relative",
                         task_map: Mapping[str, str] | None = None) -> list[Interval]:
    """Intervals of an annotation file (``.csv``, ``.json`` or ELAN ``.eaf``).

    ``tasks``: the manifest's tasks (columns / tiers naming none of them are ignored, with a
    warning).  ``t0``: the stamp of the bag's first image (s), the zero of ``relative`` times
    and of ELAN's timeline.  ``task_map``: column or tier name -> task.
    """
    path = Path(path)
    if not path.is_file():
        raise TruthError(f"annotation file not found: {path}")
    if time_base not in TIME_BASES:
        raise TruthError(f"annotation time base must be one of {', '.join(TIME_BASES)}, got {time_base!r}")
    suffix = path.suffix.lower()
    if suffix not in ANNOTATION_SUFFIXES:
        raise TruthError(f"{path}: unknown annotation format {suffix!r} (supported: {', '.join(ANNOTATION_SUFFIXES)})")
    mapping = dict(task_map or {})
    known = set(tasks)
    offset = t0 if time_base == "relative" else 0.0
    if suffix == ".eaf":
        rows = _read_elan(path)
        offset = t0  # ELAN times are media times: the first image is 0
    elif suffix == ".csv":
        rows = _read_csv(path)
    else:
        rows = _read_json(path)
    out: list[Interval] = []
    ignored: set[str] = set()
    used: set[str] = set()
    for source, start, end, labels, context in rows:
        if not end > start:
            raise TruthError(f"{source}: end {end} is not after start {start}")
        for column, label in labels.items():
            task = mapping.get(column, column)
            if task not in known:
                ignored.add(column)
                continue
            used.add(task)
            if label:
                out.append(Interval(task, label, start + offset, end + offset, context=context, source=source))
    if not used:
        raise TruthError(f"{path}: no column or tier names a task of the manifest ({', '.join(sorted(known))}); "
                         f"found {', '.join(sorted(ignored)) or 'none'}; map names with --task-map NAME=TASK")
    if ignored:
        log.warning("%s: ignoring columns / tiers that name no task of the manifest: %s", path, ", ".join(sorted(ignored)))
    return out


_Row = tuple[str, float, float, dict[str, str], "str | None"]


def _number(value: Any, source: str, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TruthError(f"{source}: {what} {value!r} is not a number of seconds") from None
    if not math.isfinite(x):
        raise TruthError(f"{source}: {what} {value!r} is not finite")
    return x


def _read_csv(path: Path) -> list[_Row]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "start" not in columns or "end" not in columns:
            raise TruthError(f"{path}: expected a header with 'start' and 'end' columns (then one column per "
                             f"task, optionally 'context'); found {', '.join(columns) or 'nothing'}")
        rows: list[_Row] = []
        for n, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(row.values()):
                continue
            src = f"{path.name} row {n}"
            labels = {k: v for k, v in row.items() if k not in _RESERVED_COLUMNS}
            rows.append((src, _number(row["start"], src, "start"), _number(row["end"], src, "end"), labels,
                         row.get("context") or None))
    return rows


def _read_json(path: Path) -> list[_Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TruthError(f"{path}: not valid JSON ({exc})") from None
    items = data.get("intervals") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise TruthError(f"{path}: expected a list of intervals, or an object with an 'intervals' list")
    rows: list[_Row] = []
    for n, item in enumerate(items):
        src = f"{path.name} interval {n}"
        if not isinstance(item, dict) or "start" not in item or "end" not in item:
            raise TruthError(f"{src}: expected an object with 'start', 'end' and task labels")
        labels = item.get("labels", {k: v for k, v in item.items() if k not in _RESERVED_COLUMNS})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise TruthError(f"{src}: task labels must be strings ({labels!r})")
        rows.append((src, _number(item["start"], src, "start"), _number(item["end"], src, "end"),
                     {str(k): v.strip() for k, v in labels.items()}, item.get("context")))
    return rows


def _read_elan(path: Path) -> list[_Row]:
    """ELAN ``.eaf``: every tier's time-aligned (and referring) annotations, times in ms."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise TruthError(f"{path}: not a valid ELAN .eaf (XML) file ({exc})") from None
    if root.tag != "ANNOTATION_DOCUMENT":
        raise TruthError(f"{path}: not an ELAN file (root element {root.tag!r}, expected ANNOTATION_DOCUMENT)")
    header = root.find("HEADER")
    units = header.get("TIME_UNITS", "milliseconds") if header is not None else "milliseconds"
    if units != "milliseconds":
        raise TruthError(f"{path}: TIME_UNITS {units!r} is not supported (ELAN writes milliseconds)")
    origin_ms = 0.0
    media = header.find("MEDIA_DESCRIPTOR") if header is not None else None
    if media is not None and media.get("TIME_ORIGIN"):
        origin_ms = _number(media.get("TIME_ORIGIN"), f"{path.name} MEDIA_DESCRIPTOR", "TIME_ORIGIN")
    slots: dict[str, float | None] = {}
    for slot in root.iter("TIME_SLOT"):
        value = slot.get("TIME_VALUE")
        slots[slot.get("TIME_SLOT_ID", "")] = None if value is None else _number(value, f"{path.name} time slot", "TIME_VALUE")
    aligned: dict[str, tuple[float, float]] = {}
    rows: list[_Row] = []
    pending_refs = []
    for tier in root.iter("TIER"):
        tier_id = tier.get("TIER_ID", "")
        for ann in tier.iter("ALIGNABLE_ANNOTATION"):
            aid = ann.get("ANNOTATION_ID", "")
            src = f"{path.name} tier {tier_id!r} annotation {aid}"
            t1, t2 = slots.get(ann.get("TIME_SLOT_REF1", "")), slots.get(ann.get("TIME_SLOT_REF2", ""))
            if t1 is None or t2 is None:
                raise TruthError(f"{src}: its time slots have no TIME_VALUE (unaligned); align it in ELAN first")
            start, end = (t1 + origin_ms) / 1000.0, (t2 + origin_ms) / 1000.0
            aligned[aid] = (start, end)
            value = (ann.findtext("ANNOTATION_VALUE") or "").strip()
            rows.append((src, start, end, {tier_id: value}, None))
        for ann in tier.iter("REF_ANNOTATION"):
            pending_refs.append((tier_id, ann))
    for tier_id, ann in pending_refs:  # a referring annotation spans the annotation it refers to
        aid, ref = ann.get("ANNOTATION_ID", ""), ann.get("ANNOTATION_REF", "")
        src = f"{path.name} tier {tier_id!r} annotation {aid}"
        if ref not in aligned:
            raise TruthError(f"{src}: refers to {ref!r}, which is not a time-aligned annotation")
        value = (ann.findtext("ANNOTATION_VALUE") or "").strip()
        rows.append((src, *aligned[ref], {tier_id: value}, None))
    return rows
