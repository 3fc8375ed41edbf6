"""``step-ros benchmark <dataset>``: the papers' comparison on a public dataset, in one command.

import (the publisher's layout -> annotations.csv, labels, nearly symmetric pairs) -> a manifest
from the shipped template (``models/templates/<dataset>_<arch>.yaml``: ViT-S/14 or ViT-B/14 at
224 px, 16 frames) -> ``compare``: extract the tokens once (float16, streamed), then train and
evaluate every head kind with the papers' recipe (batch 32, 60 epochs, lr 1e-3 cosine; SGD on
NTU, AdamW elsewhere) and the 3-view test -> a report with the columns of the papers' Table 3
(nearly symmetric / non-symmetric), overall top-1, frames reversed and shuffled, and per pair how
often each class is taken for its twin, beside the papers' published figures for the dataset.

Runs unchanged under ``torchrun`` (rank 0 imports, every rank trains its share) and with
``--device cuda``, through the scale path of ``compare``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .console import console, pct, print_table, write_json
from .data.importers import PAPERS_DIR, ImportOptions, load_pairs, make_manifest, run_import
from .resources import models_dir

__all__ = ["ARCHS", "KIND_NAMES", "RECIPES", "paper_row", "papers_figures", "pair_confusion", "run_benchmark",
           "template_path"]

ARCHS = {"vits14": "dinov2_vits14", "vitb14": "dinov2_vitb14"}
#: What differs between the datasets in the papers' recipe (SPEC section 2); the rest is TrainConfig's.
RECIPES: dict[str, dict[str, Any]] = {
    "ntu60": {"optimizer": "sgd"},
    "ntu120": {"optimizer": "sgd"},
    "ikea_asm": {"optimizer": "adamw"},
    "drive_and_act": {"optimizer": "adamw"},
    "ssv2": {"optimizer": "adamw"},
}


def template_path(dataset: str, arch: str) -> Path:
    return models_dir() / "templates" / f"{dataset}_{arch}.yaml"


def papers_figures(dataset: str) -> dict[str, Any]:
    path = PAPERS_DIR / f"{dataset}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {"rows": []}


#: How the papers name each head kind (their DINOv2 rows; CLIP and PEFT rows are not head kinds).
KIND_NAMES = {"step": "step", "attentive": "attentive probing", "self_attention": "self-attention probing",
              "linear": "linear probing"}


_PROTOCOL_NAMES = {"xsub": "cross-subject", "xset": "cross-setup", "xview": "cross-view"}


def paper_row(papers: dict[str, Any], kind: str, task: str, protocol: str | None = None) -> dict[str, Any] | None:
    """The papers' figures for a head kind on this dataset: their first DINOv2 row of that name
    (and of this protocol, where the papers report several)."""
    name = KIND_NAMES.get(kind)
    if name is None:
        return None
    wanted = _PROTOCOL_NAMES.get(protocol or "")
    for row in papers.get("rows") or []:
        method = str(row.get("method", "")).lower()
        if row.get("task", task) != task or "clip" in method or "+" in method:
            continue
        named = [p for p in _PROTOCOL_NAMES.values() if p in method]
        if named and wanted not in named:
            continue
        if method.startswith(name) and not method.startswith(name + "-"):
            return row
    return None


def pair_confusion(report: dict, task: str, labels: list[str], pairs: list[list[str]]) -> list[dict]:
    """Per nearly symmetric pair: how often each class is predicted as its twin (normal order)."""
    matrix = report["tasks"][task].get("confusion")
    if matrix is None:
        return []
    out = []
    for a, b in pairs:
        ia, ib = labels.index(a), labels.index(b)
        row_a, row_b = sum(matrix[ia]), sum(matrix[ib])
        out.append({"pair": [a, b], "a_as_b": round(matrix[ia][ib] / row_a, 4) if row_a else None,
                    "b_as_a": round(matrix[ib][ia] / row_b, 4) if row_b else None,
                    "support": [row_a, row_b]})
    return out


def run_benchmark(
    dataset: str,
    root: Path,
    out: Path,
    options: ImportOptions,
    *,
    arch: str = "vitb14",
    weights: Path | None = None,
    random_seed: int | None = None,
    template: Path | None = None,
    kinds: list[str],
    config: Any,
    runtime: Any,
    tokens: Any,
    num_clips: int = 3,
    val_fraction: float = 0.0,
    cache_root: Path | None = None,
) -> dict | None:
    from .training.jobs import compare_job

    if (weights is None) == (random_seed is None):
        raise ValueError("give the DINOv2 checkpoint with --weights (a Meta .pth or a Hugging Face folder), or "
                         "--random-weights for a smoke test whose numbers mean nothing")
    out = Path(out)
    data_dir = out / "data"
    template = Path(template) if template else template_path(dataset, arch)
    if not template.is_file():
        raise FileNotFoundError(f"no model template {template}; pass --template")
    manifest_path = out / "template.yaml"
    if runtime.is_main:
        _, summary = run_import(dataset, root, data_dir, options)
        console.print(f"imported {dataset} ({summary['protocol']}): {summary['rows']} samples, "
                      + ", ".join(f"{s} {v['rows']}" for s, v in summary["splits"].items())
                      + (f"; {summary['missing_videos']} listed videos missing" if summary["missing_videos"] else ""))
        base = yaml.safe_load(template.read_text())
        base.pop("heads", None)
        backbone = dict(base["backbone"])
        backbone.pop("weights", None)
        backbone.pop("random_seed", None)
        backbone.update({"weights": str(Path(weights).expanduser().resolve())} if weights is not None
                        else {"random_seed": int(random_seed)})
        base["backbone"] = backbone
        make_manifest(data_dir, base, manifest_path)
    runtime.barrier()
    results = compare_job(manifest_path, data_dir / "annotations.csv", out / "compare", kinds, config,
                          cache_root=Path(cache_root) if cache_root else out / "cache", num_clips=num_clips, runtime=runtime, tokens=tokens,
                          val_fraction=val_fraction)
    if results is None:
        return None
    labels = yaml.safe_load((data_dir / "labels.yaml").read_text())
    pairs = (load_pairs(dataset).get("tasks") or {})
    papers = papers_figures(dataset)
    report: dict[str, Any] = {"dataset": dataset, "protocol": options.protocol, "arch": arch,
                              "weights": str(weights) if weights else f"RANDOM (seed {random_seed})",
                              "recipe": results["config"], "num_clips": num_clips, "tasks": {}, "papers": papers}
    for task in labels:
        rows = []
        for kind in kinds:
            h = results["kinds"][kind][task]
            eval_report = json.loads((out / "compare" / kind / "eval" / "report.json").read_text())
            rows.append({"kind": kind, **{k: h.get(k) for k in ("top1", "symmetric", "non_symmetric", "reversed",
                                                                  "shuffled", "within_pair")},
                         "pairs": pair_confusion(eval_report, task, labels[task], pairs.get(task, []))})
        report["tasks"][task] = rows
        table = []
        for r in rows:
            table.append([r["kind"], "this run", pct(r["symmetric"]), pct(r["non_symmetric"]), pct(r["top1"]),
                          pct(r["reversed"]), pct(r["shuffled"]), ""])
            p = paper_row(papers, r["kind"], task, options.protocol)
            if p is not None:
                table.append(["", "papers", _paper(p.get("symmetric")), _paper(p.get("non_symmetric")),
                              _paper(p.get("top1")), _paper(p.get("reversed")), _paper(p.get("shuffled")),
                              f"{p.get('method')}: {p.get('source', '')}"])
        print_table(f"{dataset} {options.protocol} - {task}: top-1 % (the papers' Table 3 columns), beside the papers",
                    ["head", "", "nearly symmetric", "non-symmetric", "overall", "reversed", "shuffled", "papers' row"],
                    table)
        for r in rows:
            seen = [p for p in r["pairs"] if any(p["support"])]  # pairs with test videos (all are in the JSON)
            if seen:
                print_table(f"{task} - {r['kind']}: how often a class is taken for its twin (test videos)",
                            ["pair a / b", "a as b %", "b as a %", "videos a / b"],
                            [[f"{p['pair'][0]} / {p['pair'][1]}", pct(p["a_as_b"]), pct(p["b_as_a"]),
                              f"{p['support'][0]} / {p['support'][1]}"] for p in seen])
    if random_seed is not None:
        console.print("WARNING: RANDOM backbone weights: a smoke test of the pipeline; the figures mean nothing")
    write_json(report, out / "benchmark.json")
    console.print(f"benchmark report: {out / 'benchmark.json'}")
    return report


def _paper(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1f}"
