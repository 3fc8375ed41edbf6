"""NTU RGB+D 60 and NTU RGB+D 120 (ROSE Lab, NTU Singapore): RGB videos -> the project's CSV.

Layout read (docs/datasets/NTU.md): every ``SsssCcccPpppRrrrAaaa_rgb.avi`` anywhere below
``--root``, found recursively, so the per-setup archives (``nturgbd_rgb_s001.zip`` ...) may be
extracted side by side, into ``nturgb+d_rgb/`` or straight into ``--root``.  NTU ships no
annotation file: the file name *is* the annotation (shahroudy/NTURGB-D README): ``sss`` setup,
``ccc`` camera, ``ppp`` performer (subject), ``rrr`` replication, ``aaa`` action class A001..A120.
Hidden files and folders are skipped; other files (skeletons, depth, zips, notes) are ignored;
a ``*_rgb.avi`` whose name does not follow the convention is an error naming it.

Protocols (train / test; no validation split is published):

- ``ntu60`` (A001..A060 in setups S001..S017; other files are counted in the notes and left out):
  ``xsub`` (default) trains on the 20 published training subjects, ``xview`` trains on cameras
  2 and 3 and tests on camera 1.
- ``ntu120`` (A001..A120, S001..S032): ``xsub`` (default) trains on the 53 published training
  subjects, ``xset`` trains on the even setup ids and tests on the odd ones.

The subject lists and rules are copied from open-mmlab/mmaction2
tools/data/skeleton/gen_ntu_rgbd_raw.py and agree with Uason-Chen/CTR-GCN
data/ntu*/seq_transformation.py.  The list of samples with missing skeletons concerns skeleton
data only (the README says so) and is not applied to the RGB videos.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from . import DatasetImportError, ImportOptions, ImportResult, register

__all__ = ["ACTIONS", "NTU60_TRAIN_SUBJECTS", "NTU120_TRAIN_SUBJECTS", "XVIEW_TRAIN_CAMERAS", "XSET_TRAIN_SETUPS",
           "parse_name", "split_of", "import_ntu60", "import_ntu120"]

#: A001..A120 as listed in shahroudy/NTURGB-D README.md (commit ac2ebc8), "A<n>. " and the final
#: "." removed, whitespace normalised; nothing else changed (A18 is "wear on glasses" there).
ACTIONS: tuple[str, ...] = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup", "throw",
    "sitting down", "standing up (from sitting position)", "clapping", "reading", "writing", "tear up paper",
    "wear jacket", "take off jacket", "wear a shoe", "take off a shoe", "wear on glasses", "take off glasses",
    "put on a hat/cap", "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "reach into pocket", "hopping (one foot jumping)", "jump up", "make a phone call/answer phone",
    "playing with phone/tablet", "typing on a keyboard", "pointing to something with finger", "taking a selfie",
    "check time (from watch)", "rub two hands together", "nod head/bow", "shake head", "wipe face", "salute",
    "put the palms together", "cross hands in front (say stop)", "sneeze/cough", "staggering", "falling",
    "touch head (headache)", "touch chest (stomachache/heart pain)", "touch back (backache)",
    "touch neck (neckache)", "nausea or vomiting condition", "use a fan (with hand or paper)/feeling warm",
    "punching/slapping other person", "kicking other person", "pushing other person",
    "pat on back of other person", "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
    # A061..A120: NTU RGB+D 120 only
    "put on headphone", "take off headphone", "shoot at the basket", "bounce ball", "tennis bat swing",
    "juggling table tennis balls", "hush (quite)", "flick hair", "thumb up", "thumb down", "make ok sign",
    "make victory sign", "staple book", "counting money", "cutting nails", "cutting paper (using scissors)",
    "snapping fingers", "open bottle", "sniff (smell)", "squat down", "toss a coin", "fold paper",
    "ball up paper", "play magic cube", "apply cream on face", "apply cream on hand back", "put on bag",
    "take off bag", "put something into a bag", "take something out of a bag", "open a box",
    "move heavy objects", "shake fist", "throw up cap/hat", "hands up (both hands)", "cross arms",
    "arm circles", "arm swings", "running on the spot", "butt kicks (kick backward)", "cross toe touch",
    "side kick", "yawn", "stretch oneself", "blow nose", "hit other person with something",
    "wield knife towards other person", "knock over other person (hit with body)",
    "grab other person\u2019s stuff", "shoot at other person with a gun", "step on foot", "high-five",
    "cheers and drink", "carry something with other person", "take a photo of other person",
    "follow other person", "whisper in other person\u2019s ear", "exchange things with other person",
    "support somebody with hand", "finger-guessing game (playing rock-paper-scissors)",
)
assert len(ACTIONS) == 120 and len(set(ACTIONS)) == 120

#: Cross-subject training subjects (mmaction2 gen_ntu_rgbd_raw.py ``training_subjects_60`` /
#: ``training_subjects_120``; CTR-GCN seq_transformation.py ``train_ids``); every other subject tests.
NTU60_TRAIN_SUBJECTS: frozenset[int] = frozenset(
    {1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38})
NTU120_TRAIN_SUBJECTS: frozenset[int] = NTU60_TRAIN_SUBJECTS | frozenset(
    {45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92,
     93, 94, 95, 97, 98, 100, 103})
#: Cross-view (NTU60): cameras 2 and 3 train, camera 1 tests.
XVIEW_TRAIN_CAMERAS: frozenset[int] = frozenset({2, 3})
#: Cross-setup (NTU120): even setup ids train, odd ones test.
XSET_TRAIN_SETUPS: frozenset[int] = frozenset(range(2, 33, 2))

#: What each dataset spans (README: S001..S017 / S001..S032; CVPR 2016: 40 subjects; TPAMI: 106).
_SPAN = {"ntu60": {"setups": 17, "subjects": 40, "actions": 60, "total": 56_880},
         "ntu120": {"setups": 32, "subjects": 106, "actions": 120, "total": 114_480}}
_PROTOCOLS = {"ntu60": ("xsub", "xview"), "ntu120": ("xsub", "xset")}
_CAMERAS = 3
_SUFFIX = "_rgb.avi"
_NAME = re.compile(r"^S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})_rgb\.avi$")


def parse_name(name: str) -> dict[str, int] | None:
    """``S001C002P003R002A013_rgb.avi`` -> setup, camera, subject, replication, action (None if not NTU)."""
    m = _NAME.match(name)
    if m is None:
        return None
    s, c, p, r, a = (int(g) for g in m.groups())
    return {"setup": s, "camera": c, "subject": p, "replication": r, "action": a}


def split_of(dataset: str, protocol: str, ids: dict[str, int]) -> str:
    """``train`` or ``test`` for one sample under one protocol (the published membership rules)."""
    if protocol == "xsub":
        train = NTU60_TRAIN_SUBJECTS if dataset == "ntu60" else NTU120_TRAIN_SUBJECTS
        return "train" if ids["subject"] in train else "test"
    if protocol == "xview" and dataset == "ntu60":
        return "train" if ids["camera"] in XVIEW_TRAIN_CAMERAS else "test"
    if protocol == "xset" and dataset == "ntu120":
        return "train" if ids["setup"] in XSET_TRAIN_SETUPS else "test"
    raise DatasetImportError(f"{dataset}: unknown protocol {protocol!r}")


def _walk(root: Path) -> tuple[list[Path], Counter[str]]:
    """Every non-hidden ``*_rgb.avi`` below ``root`` (links followed, loops not), and what else was seen."""
    found: list[Path] = []
    other: Counter[str] = Counter()
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(_SUFFIX):
                found.append(Path(dirpath) / name)
            else:
                other[Path(name).suffix.lower() or name] += 1
    return found, other


def _view(options: ImportOptions, protocol: str) -> int | None:
    """``--view``: keep one camera (1, 2 or 3; ``C002`` also accepted)."""
    if options.view is None:
        return None
    if protocol == "xview":
        raise DatasetImportError("ntu60 xview: --view cannot be combined with the cross-view protocol, whose "
                                 "splits are the cameras (train 2 and 3, test 1); use xsub")
    digits = re.fullmatch(r"[cC]?0*([1-9]\d*)", str(options.view).strip())
    if digits is None or not 1 <= int(digits.group(1)) <= _CAMERAS:
        raise DatasetImportError(f"--view {options.view!r}: expected an NTU camera id 1, 2 or 3 (or C001..C003)")
    return int(digits.group(1))


def _absent(path: Path) -> bool:
    """Listed but unusable: a broken link or an empty (0-byte, interrupted) file."""
    try:
        return path.stat().st_size == 0
    except OSError:
        return True


def _import(dataset: str, root: Path, options: ImportOptions) -> ImportResult:
    span = _SPAN[dataset]
    protocol = options.protocol or "xsub"
    if protocol not in _PROTOCOLS[dataset]:
        raise DatasetImportError(f"{dataset}: unknown protocol {protocol!r}; choose one of "
                                 f"{', '.join(_PROTOCOLS[dataset])}")
    if options.fraction is not None:
        raise DatasetImportError(f"{dataset}: --fraction is the Something-Something v2 low-data protocol; "
                                 "NTU RGB+D has none (leave it out)")
    camera = _view(options, protocol)
    root = Path(root)
    files, other = _walk(root)
    if not files:
        zips = sorted(p.name for p in root.glob("*.zip"))
        hint = (f"; found archives ({', '.join(zips[:3])}{' ...' if len(zips) > 3 else ''}): extract them first"
                if zips else "")
        raise DatasetImportError(
            f"{root}: no *_rgb.avi video below this folder; expected NTU RGB+D RGB videos named "
            f"SsssCcccPpppRrrrAaaa_rgb.avi (e.g. S001C002P003R002A013_rgb.avi) from nturgbd_rgb_s0XX.zip{hint}")

    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    by_stem: dict[str, Path] = {}
    ignored_actions = ignored_setups = ignored_camera = 0
    for path in files:
        ids = parse_name(path.name)
        if ids is None:
            raise DatasetImportError(
                f"{path}: file name does not follow NTU's SsssCcccPpppRrrrAaaa_rgb.avi convention "
                f"(e.g. S001C002P003R002A013_rgb.avi); rename it or move it out of {root}")
        s, c, p, a = ids["setup"], ids["camera"], ids["subject"], ids["action"]
        if not 1 <= a <= 120:
            raise DatasetImportError(f"{path}: unknown label A{a:03d}: NTU RGB+D 120's action classes are "
                                     "A001..A120 (shahroudy/NTURGB-D README)")
        if not 1 <= c <= _CAMERAS:
            raise DatasetImportError(f"{path}: camera C{c:03d} is not one of NTU's three cameras C001..C003")
        if not 1 <= s <= 32:
            raise DatasetImportError(f"{path}: setup S{s:03d} is outside NTU RGB+D 120's S001..S032")
        if dataset == "ntu60" and a > span["actions"]:
            ignored_actions += 1
            continue
        if dataset == "ntu60" and s > span["setups"]:
            ignored_setups += 1
            continue
        if not 1 <= p <= span["subjects"]:
            raise DatasetImportError(f"{path}: performer P{p:03d} is outside {dataset}'s subjects "
                                     f"P001..P{span['subjects']:03d}")
        stem = path.name[: -len(_SUFFIX)]
        if stem in by_stem:
            raise DatasetImportError(f"{path}: sample {stem} is also at {by_stem[stem]}; keep one copy "
                                     "(an archive extracted twice?)")
        by_stem[stem] = path
        if camera is not None and c != camera:
            ignored_camera += 1
            continue
        video = os.path.abspath(path)
        if _absent(path):
            missing.append(video)
            continue
        rows.append({"video": video, "start_frame": None, "end_frame": None,
                     "split": split_of(dataset, protocol, ids), "context": None, "action": ACTIONS[a - 1],
                     "_setup": s, "_camera": c, "_subject": p, "_replication": ids["replication"]})

    if missing and not options.skip_missing:
        raise DatasetImportError(
            f"{dataset}: {len(missing)} videos are listed but absent (broken link or empty 0-byte file), "
            f"first {missing[0]}; download them again or pass --skip-missing to leave them out")
    notes = _notes(dataset, root, rows, len(files), other, ignored_actions, ignored_setups, ignored_camera,
                   missing, camera)
    if not rows:
        raise DatasetImportError(f"{root}: none of the {len(files)} *_rgb.avi videos is a {dataset} sample "
                                 f"({'; '.join(notes[1:]) or 'see docs/datasets/NTU.md'})")
    rows.sort(key=lambda r: Path(r["video"]).name)
    return ImportResult(dataset=dataset, protocol=protocol, rows=rows,
                        tasks={"action": list(ACTIONS[: span["actions"]])}, missing=missing, notes=notes,
                        options={"protocol": protocol, "view": camera, "skip_missing": options.skip_missing})


def _notes(dataset: str, root: Path, rows: list[dict[str, Any]], n_files: int, other: Counter[str],
           ignored_actions: int, ignored_setups: int, ignored_camera: int, missing: list[str],
           camera: int | None) -> list[str]:
    """What the user should know about this import: what was left out and how complete it is."""
    span = _SPAN[dataset]
    notes = [f"read {n_files} *_rgb.avi files below {root}"]
    if ignored_actions:
        notes.append(f"left out {ignored_actions} videos of actions A061..A120 (NTU RGB+D 120 only)")
    if ignored_setups:
        notes.append(f"left out {ignored_setups} videos of setups S018..S032 (NTU RGB+D 120 only)")
    if ignored_camera:
        notes.append(f"--view {camera}: left out {ignored_camera} videos of the other cameras")
    if missing:
        notes.append(f"left out {len(missing)} listed videos that are absent or empty (--skip-missing)")
    if other:
        notes.append("ignored other files: " + ", ".join(f"{n} {ext}" for ext, n in sorted(other.items())))
    setups = sorted({r["_setup"] for r in rows})
    if setups:
        notes.append(f"{len(rows)} samples from {len(setups)} setups ({_ranges(setups)}); the full release has "
                     f"{span['total']:,} in {span['setups']} setups")
    if camera is None:
        views = Counter((r["_setup"], r["_subject"], r["_replication"], r["action"]) for r in rows)
        partial = sum(1 for n in views.values() if n < _CAMERAS)
        if partial:
            notes.append(f"{partial} performances lack one or more of the 3 camera views (an incomplete "
                         "download or extraction?)")
    notes.append("the published list of samples with missing skeletons concerns skeletons only; not applied")
    notes.append("format facts, protocols and their sources: docs/datasets/NTU.md")
    return notes


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> 'S001-S003, S005'."""
    out: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"S{start:03d}" if start == prev else f"S{start:03d}-S{prev:03d}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


@register("ntu60", _PROTOCOLS["ntu60"], "xsub",
          "NTU RGB+D 60: 60 actions, RGB *_rgb.avi; cross-subject or cross-view")
def import_ntu60(root: Path, options: ImportOptions) -> ImportResult:
    """NTU RGB+D (60 classes) from its RGB videos; actions A061+ and setups S018+ are left out."""
    return _import("ntu60", root, options)


@register("ntu120", _PROTOCOLS["ntu120"], "xsub",
          "NTU RGB+D 120: 120 actions, RGB *_rgb.avi; cross-subject or cross-setup")
def import_ntu120(root: Path, options: ImportOptions) -> ImportResult:
    """NTU RGB+D 120 from its RGB videos (the papers' dataset: cross-subject and cross-setup)."""
    return _import("ntu120", root, options)
