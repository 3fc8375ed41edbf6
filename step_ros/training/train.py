"""Train the heads of a manifest on cached tokens (paper recipe, SPEC section 2).

Backbone frozen (its tokens come from the cache); all heads of the manifest train together on
the same clips, one cross-entropy per task.  AdamW, lr 1e-3 with cosine annealing, batch 32,
60 epochs by default; temporal jitter (a random clip start per video and epoch), never a
temporal flip.  With ``hflip`` (the papers' horizontal flip; only for labels that a mirror image
does not change) each clip is drawn from the mirrored frames' tokens half of the time.

What makes it fit for real data (docs/DECISIONS.md, decisions 16-19):

* windows stream from the cache through a DataLoader (``loader.py``): memory is O(batch);
* ``torchrun`` ranks train one model with DistributedDataParallel on shares of the same global
  batches, and the loss is scaled so that N ranks compute one process's gradient;
* a validation split is scored every epoch, the best epoch's heads are kept, early stopping
  is optional, and overfitting or chance-level heads are reported;
* a resume checkpoint (safetensors) is written every ``checkpoint_every`` steps, at every epoch
  end and on Ctrl-C / SIGTERM; ``resume`` continues exactly, to the bit on one CPU process.

Output: ``<out>/heads/<task>.safetensors`` (config in the metadata), a manifest pointing at
them, and ``train_log.json`` + ``train_curve.png``; when validation kept an earlier epoch, the
last epoch's heads too, in ``<out>/last/`` (manifest and heads), to compare.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.annotations import Dataset, check_labels
from ..model.manifest import Manifest
from ..model.multitask import build_head, save_head
from .checkpoint import load_state, save_state
from .loader import GlobalBatchSampler, Split, ViewDataset, WindowDataset, make_loader
from .runtime import Runtime

log = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.02
    optimizer: str = "adamw"  # adamw | sgd (the papers use SGD on NTU)
    seed: int = 0
    hflip: bool = False  # horizontal-flip augmentation from cached mirrored tokens
    early_stop: int = 0  # stop after this many epochs without a better validation score; 0: never
    checkpoint_every: int = 500  # optimizer steps between resume checkpoints (also every epoch end)


#: Fields that may differ between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"checkpoint_every", "early_stop"}


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the state was saved at a step boundary; ``--resume`` continues."""


class HeadSet(nn.ModuleDict):
    """The heads of a manifest as one module (what DistributedDataParallel wraps)."""

    def forward(self, window: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {task: head(window) for task, head in self.items()}


@dataclass
class TrainResult:
    heads: dict[str, nn.Module]
    log: list[dict]
    selected_epoch: int
    selection: str  # "best validation" or "last epoch"
    warnings: list[str] = field(default_factory=list)
    stopped_early: bool = False
    last_heads: dict[str, dict[str, torch.Tensor]] | None = None  # the last epoch's, when another was kept


def label_indices(dataset: Dataset, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Class index per sample and task; labels not in the manifest are an error naming them."""
    out = {}
    for spec in manifest.heads:
        if spec.task not in dataset.tasks:
            raise ValueError(
                f"task {spec.task!r} of the manifest has no column in {dataset.source} (columns: {dataset.tasks})"
            )
        check_labels(dataset, spec.task, spec.labels)
        out[spec.task] = torch.tensor([spec.labels.index(s.labels[spec.task]) for s in dataset])
    return out


def _optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {config.optimizer!r}")


def _model_signature(manifest: Manifest, num_samples: int) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {"frames": manifest.frames, "frame_interval": manifest.frame_interval, "num_samples": num_samples,
            "heads": [[s.task, s.kind, list(s.labels)] for s in manifest.heads]}


class _StopFlag:
    """Ctrl-C / SIGTERM ask for a stop at the next step boundary instead of killing the step."""

    def __init__(self) -> None:
        self.requested = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): saving a checkpoint after this step", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _head_states(heads: HeadSet) -> dict[str, dict[str, torch.Tensor]]:
    return {task: {k: v.detach().cpu().clone() for k, v in h.state_dict().items()} for task, h in heads.items()}


def validation_loader(val: Split, manifest: Manifest, runtime: Runtime, batch_size: int):
    """The centred clip of every validation video, this rank's share of the videos."""
    views = ViewDataset(val.source, manifest.frames, manifest.frame_interval, num_clips=1,
                        sample_period_s=manifest.sample_period_s, clip_sampling=manifest.clip_sampling)
    return make_loader(views, runtime, indices=list(runtime.shard(len(val))), batch_size=batch_size)


@torch.inference_mode()
def validate(heads: HeadSet, loader, labels: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, float]:
    """Validation loss and top-1 per task, summed over ranks."""
    heads.eval()
    tasks = list(heads.keys())
    sums = torch.zeros(2 + len(tasks), dtype=torch.float64, device="cpu")  # loss, count, correct per task
    for index, window in loader:
        window = window[:, 0].to(runtime.device, non_blocking=True).float()
        with runtime.autocast():
            logits = heads(window)
        for t, task in enumerate(tasks):
            target = labels[task][index].to(runtime.device)
            lt = logits[task].float()
            sums[0] += float(F.cross_entropy(lt, target, reduction="sum"))
            sums[2 + t] += float((lt.argmax(-1) == target).sum())
        sums[1] += len(index)
    runtime.all_reduce_sum(sums)
    n = max(1.0, float(sums[1]))
    out = {"val_loss": float(sums[0]) / n}
    for t, task in enumerate(tasks):
        out[f"val_acc/{task}"] = float(sums[2 + t]) / n
    out["val_acc"] = float(np.mean([out[f"val_acc/{t}"] for t in tasks]))
    return out


def _better(entry: dict, best: dict | None) -> bool:
    """Higher mean validation top-1 wins; equal top-1 goes to the lower validation loss."""
    if best is None:
        return True
    return (entry["val_acc"], -entry["val_loss"]) > (best["val_acc"], -best["val_loss"])


def train_heads(
    manifest: Manifest,
    dim: int,
    num_tokens: int,
    train: Split,
    config: TrainConfig,
    *,
    runtime: Runtime | None = None,
    val: Split | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train one head per manifest entry on ``train``; select by ``val`` when given.

    ``state_path``: where the resume checkpoint lives (none: no checkpoints).  With ``resume``
    training continues from it; the recipe and data must be those of the interrupted run.
    """
    runtime = runtime or Runtime(torch.device("cpu"))
    show = progress and runtime.is_main
    if config.hflip:
        train.source.require_mirrored()
    torch.manual_seed(config.seed)
    with torch.device("cpu"):  # the same initial weights whatever the device, then moved there
        heads = HeadSet({s.task: build_head(s, dim, manifest.frames, num_tokens) for s in manifest.heads})
    heads.to(runtime.device)
    opt = _optimizer(heads.parameters(), config)
    sampler = GlobalBatchSampler(len(train), config.batch_size, config.seed, runtime.rank, runtime.world_size)
    steps_per_epoch = sampler.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    signature = _model_signature(manifest, len(train))
    tasks = list(heads.keys())

    epoch, step, log_entries, best = 0, 0, [], None
    totals = np.zeros(2 + len(tasks))  # loss sum, windows, correct per task (over all ranks)
    seconds = 0.0
    if resume:
        state = _load_resume(state_path, config, signature)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, log_entries, best = state["epoch"], state["step"], state["log"], state["best"]
        totals, seconds = np.asarray(state["totals"], dtype=np.float64), state["seconds"]
        if runtime.is_main:
            log.info("resuming from %s at epoch %d, step %d of %d", state_path, epoch + 1, step, steps_per_epoch)

    def save(note: str) -> None:
        if state_path is None or not runtime.is_main:
            return
        save_state(state_path, {
            "config": asdict(config), "signature": signature, "epoch": epoch, "step": step,
            "totals": totals.tolist(), "seconds": seconds, "log": log_entries, "best": best,
            "heads": heads.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "note": note})

    if runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model: nn.Module = DistributedDataParallel(
            heads, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
    else:
        model = heads
    loader = make_loader(WindowDataset(train.source, manifest.frames, manifest.frame_interval, config.seed,
                                       config.hflip, sample_period_s=manifest.sample_period_s,
                                       clip_sampling=manifest.clip_sampling),
                         runtime, batch_sampler=sampler)
    labels = {t: train.labels[t].to(runtime.device) for t in tasks}
    val_loader = validation_loader(val, manifest, runtime, config.batch_size) if val is not None else None
    stopped_early = False
    with _StopFlag() as stop, tqdm(total=config.epochs, initial=epoch, desc="train", unit="epoch",
                                   disable=not show) as bar:
        while epoch < config.epochs:
            heads.train()
            sampler.set_epoch(epoch, step)
            start = time.perf_counter()
            with tqdm(loader, total=len(sampler), desc=f"epoch {epoch + 1}", unit="step", leave=False,
                      disable=not show or steps_per_epoch < 20) as steps:
                for index, weight, window in steps:
                    n_global = min(config.batch_size, len(train) - step * config.batch_size)
                    stats = _train_step(model, opt, sched, scaler, runtime, window, weight, index, labels, n_global)
                    stats = torch.cat([stats, torch.tensor([float(stop.requested)], dtype=torch.float64,
                                                           device="cpu")])
                    runtime.all_reduce_sum(stats)
                    totals += stats[:-1].numpy()
                    step += 1
                    if stats[-1] > 0:
                        seconds += time.perf_counter() - start
                        save("interrupted")
                        where = (f"the state is in {state_path}: run the same command with --resume to continue"
                                 if state_path else "no checkpoint was asked for")
                        raise TrainingInterrupted(f"stopped at epoch {epoch + 1}, step {step} of {steps_per_epoch}; "
                                                  f"{where}")
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < steps_per_epoch:
                        seconds += time.perf_counter() - start
                        start = time.perf_counter()
                        save("periodic")
            seconds += time.perf_counter() - start
            entry = {"epoch": epoch + 1, "loss": totals[0] / max(1.0, totals[1]), "lr": sched.get_last_lr()[0],
                     "seconds": seconds, "windows_per_s": totals[1] / max(seconds, 1e-9),
                     **{f"train_acc/{t}": totals[2 + i] / max(1.0, totals[1]) for i, t in enumerate(tasks)}}
            if val is not None:
                entry.update(validate(heads, val_loader, val.labels, runtime))
                if _better(entry, best):
                    best = {"epoch": epoch + 1, "val_acc": entry["val_acc"], "val_loss": entry["val_loss"],
                            "heads": _head_states(heads)}
            log_entries.append(entry)
            epoch, step, seconds = epoch + 1, 0, 0.0
            totals = np.zeros(2 + len(tasks))
            bar.update(1)
            bar.set_postfix(_postfix(entry, tasks))
            if val is not None and config.early_stop and best and epoch - best["epoch"] >= config.early_stop:
                stopped_early = True
                if runtime.is_main:
                    log.info("early stop after epoch %d: no better validation score for %d epochs (best: epoch %d)",
                             epoch, config.early_stop, best["epoch"])
            save("epoch end")
            if stopped_early:
                break
    last_heads = None
    if best is not None:
        if best["epoch"] != len(log_entries):
            last_heads = _head_states(heads)
        heads.load_state_dict({f"{t}.{k}": v for t, sd in best["heads"].items() for k, v in sd.items()})
        selected, selection = best["epoch"], "best validation"
    else:
        selected, selection = len(log_entries), "last epoch"
    heads.cpu().eval()
    warnings = diagnose(log_entries, selected, tasks, train, val)
    if runtime.is_main:
        for w in warnings:
            log.warning(w)
    return TrainResult(dict(heads.items()), log_entries, selected, selection, warnings, stopped_early, last_heads)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, scaler, runtime: Runtime, window: torch.Tensor,
                weight: torch.Tensor, index: torch.Tensor, labels: dict[str, torch.Tensor],
                n_global: int) -> torch.Tensor:
    """One optimizer step on this rank's share of a global batch; returns (loss sum, windows,
    correct per task) over the share, for the epoch's figures."""
    window = window.to(runtime.device, non_blocking=True).float()  # float16 from the cache
    weight = weight.to(runtime.device, dtype=torch.float32)
    index = index.to(runtime.device)
    with runtime.autocast():
        logits = model(window)
    loss = window.new_zeros(())
    stats = torch.zeros(2 + len(labels), dtype=torch.float64, device="cpu")
    for t, (task, targets) in enumerate(labels.items()):
        lt = logits[task].float()
        target = targets[index]
        loss = loss + (F.cross_entropy(lt, target, reduction="none") * weight).sum()
        stats[2 + t] = float(((lt.argmax(-1) == target).float() * weight).sum())
    stats[0], stats[1] = float(loss.detach()), float(weight.sum())
    # The sum over this rank's windows, scaled so that DDP's mean over ranks is the mean over
    # the global batch: N ranks compute one process's gradient.
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss * (runtime.world_size / n_global)).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return stats


def _postfix(entry: dict, tasks: list[str]) -> dict[str, str]:
    out = {"loss": f"{entry['loss']:.3f}"}
    for t in tasks:
        out[t[:10]] = f"{entry[f'train_acc/{t}']:.2f}" + (f"/{entry[f'val_acc/{t}']:.2f}" if "val_acc" in entry else "")
    return out


def _load_resume(state_path: Path | None, config: TrainConfig, signature: dict) -> dict:
    if state_path is None or not Path(state_path).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {state_path}; start the run without --resume")
    state = load_state(state_path)
    saved = state["config"]
    changed = [f.name for f in fields(config) if f.name not in _RESUMABLE_CHANGES
               and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} then, {getattr(config, k)!r} now" for k in changed)
        raise ValueError(f"--resume: the recipe differs from the interrupted run's ({diffs}); "
                         "resume with the same options, or start a new run in another --out folder")
    if state["signature"] != signature:
        raise ValueError("--resume: the manifest's heads or the training data differ from the interrupted run's "
                         f"({state['signature']} then, {signature} now)")
    return state


def diagnose(log_entries: list[dict], selected: int, tasks: list[str], train: Split, val: Split | None) -> list[str]:
    """Plain warnings a person should read before trusting the heads."""
    out = []
    if val is None:
        out.append("no validation split: the heads are the last epoch's and nothing checked that they generalise; "
                   "add `val` rows to the annotations or pass --val-fraction")
        split, key = train, "train_acc"
    else:
        split, key = val, "val_acc"
    entry = log_entries[selected - 1]
    last = log_entries[-1]
    for task in tasks:
        y = split.labels[task].numpy()
        majority = np.bincount(y).max() / len(y)  # what always guessing the commonest class scores
        noise = 2 * math.sqrt(majority * (1 - majority) / len(y))
        acc = entry[f"{key}/{task}"]
        if acc <= majority + noise:
            out.append(f"head '{task}' is at chance: {100 * acc:.1f} % {key.replace('_acc', '')} accuracy against "
                       f"{100 * majority:.1f} % for always guessing the commonest class")
        if val is not None:
            gap = last[f"train_acc/{task}"] - last[f"val_acc/{task}"]
            if gap > 0.25:
                out.append(f"head '{task}' overfits: {100 * last[f'train_acc/{task}']:.1f} % train against "
                           f"{100 * last[f'val_acc/{task}']:.1f} % validation accuracy in the last epoch; more data, "
                           "--hflip, fewer --epochs or a higher --weight-decay may help")
    return out


def save_trained(
    manifest: Manifest, result: TrainResult, out_dir: str | Path, *, dim: int, num_tokens: int,
    config: TrainConfig, backbone_source: str, extra_log: dict | None = None,
) -> Manifest:
    """Write head checkpoints, the trained manifest, the log and the training curve."""
    out = Path(out_dir)
    trained = copy.deepcopy(manifest)
    for spec in trained.heads:
        spec.checkpoint = save_head(
            result.heads[spec.task], spec, out / "heads" / f"{spec.task}.safetensors", dim=dim,
            frames=trained.frames, num_tokens=num_tokens, backbone=backbone_source,
            extra={"epochs": config.epochs, "lr": config.lr, "epoch": result.selected_epoch},
        )
    trained.save(out / "manifest.yaml")
    shutil.rmtree(out / "last", ignore_errors=True)  # an earlier run's
    if result.last_heads is not None:  # the last epoch's heads too, beside the kept ones, to compare
        last = copy.deepcopy(manifest)
        for spec in last.heads:
            head = copy.deepcopy(result.heads[spec.task])
            head.load_state_dict(result.last_heads[spec.task])
            spec.checkpoint = save_head(head, spec, out / "last" / "heads" / f"{spec.task}.safetensors", dim=dim,
                                        frames=last.frames, num_tokens=num_tokens, backbone=backbone_source,
                                        extra={"epochs": config.epochs, "lr": config.lr, "epoch": len(result.log)})
        last.save(out / "last" / "manifest.yaml")
    (out / "train_log.json").write_text(json.dumps({
        "config": asdict(config), "selected_epoch": result.selected_epoch, "selection": result.selection,
        "stopped_early": result.stopped_early, "warnings": result.warnings, **(extra_log or {}),
        "epochs": result.log}, indent=1))
    from .report import plot_training

    plot_training(result.log, out / "train_curve.png", selected=result.selected_epoch)
    return trained


__all__ = ["HeadSet", "STATE_FILE", "TrainConfig", "TrainResult", "TrainingInterrupted", "diagnose", "label_indices",
           "save_trained", "train_heads", "validate", "validation_loader"]
