"""Dataset scale: float16 token store, streamed windows, validation, resume, devices and torchrun.

The torchrun tests start real ``torchrun`` jobs (2 processes, gloo on the CPU) and compare
them with one process: PyTorch's own distributed engine, nothing mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, synthetic_manifest
from step_ros.data.annotations import carve_validation, load_annotations
from step_ros.data.synthetic import FINE_ACTIONS, generate
from step_ros.model.manifest import load_manifest
from step_ros.model.multitask import backbone_from_manifest
from step_ros.training.cache import CacheError, TokenCache, _to_storage, extract, migrate
from step_ros.training.jobs import TokenOptions, evaluate_job, extract_job, select, train_job
from step_ros.training.loader import GlobalBatchSampler, Split, StreamedTokens, TokensInRam, ViewDataset
from step_ros.training.runtime import DeviceError, Runtime, RuntimeConfigError, resolve_device, resolve_precision
from step_ros.training.train import TrainConfig, diagnose, label_indices, validate, validation_loader

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible to PyTorch on this machine)")
HEADS = ("fine_action", "atomic_action", "object_in_use")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic set: 3 train / 1 val / 1 test video per class, and a 3-head manifest."""
    root = tmp_path_factory.mktemp("scale")
    csv = generate(root / "data", seed=4, videos_per_class={"train": 3, "val": 1, "test": 1}, unknown_per_class=1,
                   size=64, num_frames=13, progress=False)
    template = synthetic_manifest(root / "template.yaml", "tiny-scale")
    return root, csv, template


def _heads(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {t: load_file(str(out / "heads" / f"{t}.safetensors")) for t in HEADS}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[t][k] - b[t][k]).abs().max()) for t in a for k in a[t])


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step_ros", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "step_ros", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ the token store


def test_cache_stores_float16_half_the_bytes_of_float32(data, tmp_path):
    root, csv, template = data
    half = extract_job(template, csv, tmp_path / "c16", split="test")
    full = extract_job(template, csv, tmp_path / "c32", split="test", tokens=TokenOptions(dtype="float32"))
    sample = select(load_annotations(csv), "test")[0]
    a, b = half.load(sample), full.load(sample)
    assert a.dtype == torch.float16 and b.dtype == torch.float32
    torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-3)
    size = lambda c: sum(p.stat().st_size for p in c.root.glob("*.safetensors"))  # noqa: E731
    assert size(half) / size(full) < 0.51  # the headers (metadata: segment, fps, ...) are the rest
    info = json.loads((half.root / "cache.json").read_text())
    assert info == {"format": 2, "dtype": "float16", "frame_stride": 1, "backbone": half.backbone_id}
    with safe_open(str(half.path(sample)), "pt") as f:
        meta = f.metadata()
    assert meta["dtype"] == "float16" and meta["num_frames"] == "13" and meta["format"] == "2"


def test_streamed_clip_reads_only_the_asked_rows(data, tmp_path):
    root, csv, template = data
    cache = extract_job(template, csv, tmp_path / "c", split="test")
    sample = select(load_annotations(csv), "test")[0]
    whole = cache.load(sample)
    rows = np.array([3, 1, 1, 12])  # any order, repeats
    assert torch.equal(cache.clip(sample, lambda n: rows), whole[torch.from_numpy(rows)])


def test_old_float32_cache_is_refused_with_the_way_out_then_migrated(data, tmp_path):
    root, csv, template = data
    backbone = backbone_from_manifest(load_manifest(template))
    dataset = select(load_annotations(csv), "test")
    cache = TokenCache.for_backbone(tmp_path / "old", backbone)
    cache.root.mkdir(parents=True)
    originals = {}
    for s in dataset:  # what step_ros wrote before format 2: float32, no marker
        tokens = torch.randn(13, 1 + backbone.num_patches, backbone.dim)
        originals[cache.path(s)] = tokens
        save_file({"tokens": tokens}, str(cache.path(s)), metadata={"video": str(s.video), "hflip": "false"})
    with pytest.raises(CacheError, match="old float32 format.*step-ros migrate-cache"):
        extract(dataset, backbone, cache)
    result = _cli("extract", "--manifest", str(template), "--data", str(csv), "--cache", str(tmp_path / "old"),
                  "--split", "test")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("step-ros extract: error: token cache")
    assert "migrate-cache" in result.stderr and "Traceback" not in result.stderr
    assert migrate(tmp_path / "old", progress=False) == [cache.root]
    cache.check()
    for s in dataset:
        torch.testing.assert_close(cache.load(s), originals[cache.path(s)].half())
    assert migrate(tmp_path / "old", progress=False) == []  # nothing left to do
    with pytest.raises(CacheError, match="holds float16 tokens"):
        TokenCache.for_backbone(tmp_path / "old", backbone, dtype="float32").check()


def test_tokens_beyond_float16_are_an_error_not_inf(data, tmp_path):
    root, csv, template = data
    backbone = backbone_from_manifest(load_manifest(template))
    cache = TokenCache.for_backbone(tmp_path, backbone)
    cache.check(create=True)
    sample = select(load_annotations(csv), "test")[0]
    tokens = torch.ones(2, 3, 4)
    tokens[1, 2, 3] = 1e6
    with pytest.raises(CacheError, match="bfloat16"):
        _to_storage(tokens, cache, sample)
    bf16 = TokenCache.for_backbone(tmp_path / "bf16", backbone, dtype="bfloat16")
    assert _to_storage(tokens, bf16, sample).dtype == torch.bfloat16
    tokens[0, 0, 0] = float("nan")
    with pytest.raises(CacheError, match="non-finite"):
        _to_storage(tokens, bf16, sample)


def test_frame_stride_caches_every_kth_frame_and_gives_the_same_windows(data, tmp_path):
    root, csv, template = data
    dataset = select(load_annotations(csv), "test")
    full = extract_job(template, csv, tmp_path, split="test")
    strided = extract_job(template, csv, tmp_path, split="test", tokens=TokenOptions(frame_stride=2))
    assert strided.root.name.endswith("-stride2") and strided.root != full.root
    s = dataset[0]
    assert len(strided.load(s)) == 7  # frames 0, 2, ..., 12 of 13
    torch.testing.assert_close(strided.load(s).float(), full.load(s)[::2].float(), rtol=2e-3, atol=2e-3)
    # Evaluation views on the grid are the stride-1 views that start on even frames.
    a = ViewDataset(StreamedTokens(strided, dataset), frames=4, frame_interval=2, num_clips=3)[0][1]
    b = ViewDataset(StreamedTokens(full, dataset), frames=4, frame_interval=2, num_clips=3)[0][1]
    torch.testing.assert_close(a[0].float(), b[0].float(), rtol=2e-3, atol=2e-3)  # first view: frames 0, 2, 4, 6
    with pytest.raises(ValueError, match="frame-stride that divides"):
        extract_job(template, csv, tmp_path, split="test", tokens=TokenOptions(frame_stride=3))


def test_segments_of_one_video_are_decoded_once_and_cached_apart(tmp_path):
    from step_ros.data.video import write_video

    frames = np.zeros((20, 32, 32, 3), np.uint8)
    for i in range(20):
        frames[i, :, :, 0] = 10 * i  # every frame different
    write_video(tmp_path / "v.mp4", frames, fps=10)
    (tmp_path / "a.csv").write_text("video,start_frame,end_frame,fine_action\n"
                                    "v.mp4,0,8,pick_up\nv.mp4,5,15,put_down\nv.mp4,12,,wave\n")
    from conftest import tiny_manifest_dict
    from step_ros.model.manifest import parse_manifest
    from step_ros.model.multitask import backbone_from_manifest as build

    backbone = build(parse_manifest(tiny_manifest_dict(), ROOT))
    dataset = load_annotations(tmp_path / "a.csv")
    cache = extract(dataset, backbone, TokenCache.for_backbone(tmp_path / "c", backbone), progress=False)
    lengths = [len(cache.load(s)) for s in dataset]
    assert lengths == [8, 10, 8]  # the last segment runs to the end of the 20-frame video
    from step_ros.data.video import read_video

    expected = backbone.encode(read_video(tmp_path / "v.mp4", 5, 15))
    torch.testing.assert_close(cache.load(dataset[1]).float(), expected, rtol=1e-3, atol=1e-3)
    (tmp_path / "b.csv").write_text("video,start_frame,end_frame,fine_action\nv.mp4,30,40,wave\n")
    from step_ros.data.video import VideoError

    with pytest.raises(VideoError, match="starts after the last frame"):
        extract(load_annotations(tmp_path / "b.csv"), backbone, TokenCache.for_backbone(tmp_path / "c", backbone),
                progress=False)


# ------------------------------------------------------------------ sampling


def test_global_batches_are_split_across_ranks_without_loss():
    for n, batch, world in [(13, 5, 2), (7, 4, 3), (5, 8, 2), (9, 3, 4)]:
        single = GlobalBatchSampler(n, batch, seed=1)
        ranks = [GlobalBatchSampler(n, batch, seed=1, rank=r, world_size=world) for r in range(world)]
        for epoch in range(2):
            for s in [single, *ranks]:
                s.set_epoch(epoch)
            for step, parts in enumerate(zip(list(single), *[list(r) for r in ranks])):
                one, shares = parts[0], parts[1:]
                real = sorted(i for share in shares for _, i, w in share if w > 0)
                assert real == sorted(i for _, i, _ in one)  # same global batch, nothing twice
                assert all(len(share) >= 1 for share in shares)  # every rank takes a step
        single.set_epoch(1, start_step=1)
        assert len(list(single)) == single.steps_per_epoch - 1


def test_carve_validation_moves_whole_videos_per_class(data):
    root, csv, template = data
    train = select(load_annotations(csv), "train")
    a_train, a_val = carve_validation(train, 0.34, "fine_action", seed=3)
    b_train, b_val = carve_validation(train, 0.34, "fine_action", seed=3)
    assert [s.video for s in a_val] == [s.video for s in b_val]  # seeded
    assert {s.video for s in a_train}.isdisjoint({s.video for s in a_val})
    per_class = {lab: sum(s.labels["fine_action"] == lab for s in a_val) for lab in FINE_ACTIONS}
    assert set(per_class.values()) == {1}  # 3 videos per class -> 1 held out, 2 kept
    with pytest.raises(ValueError, match="between 0 and 1"):
        carve_validation(train, 1.0, "fine_action")


# ------------------------------------------------------------------ training


def test_streamed_and_in_ram_training_give_identical_heads(data, tmp_path):
    root, csv, template = data
    config = TrainConfig(epochs=2, batch_size=7, hflip=True)
    cache = root / "cache"
    train_job(template, csv, tmp_path / "ram", config, cache_root=cache, tokens=TokenOptions(load="ram"),
              runtime=Runtime(torch.device("cpu"), workers=0))
    train_job(template, csv, tmp_path / "stream", config, cache_root=cache,
              runtime=Runtime(torch.device("cpu"), workers=2))
    a, b = _heads(tmp_path / "ram"), _heads(tmp_path / "stream")
    assert all(torch.equal(a[t][k], b[t][k]) for t in a for k in a[t])


def test_validation_keeps_the_best_epoch_and_reports_it(data, tmp_path):
    root, csv, template = data
    config = TrainConfig(epochs=4, batch_size=8, lr=3e-3)
    trained = train_job(template, csv, tmp_path / "run", config, cache_root=root / "cache")
    logged = json.loads((tmp_path / "run" / "train_log.json").read_text())
    epochs = logged["epochs"]
    assert logged["selection"] == "best validation" and logged["num_val"] == len(FINE_ACTIONS)
    assert all({"val_loss", "val_acc", "val_acc/fine_action", "train_acc/fine_action"} <= set(e) for e in epochs)
    best = max(epochs, key=lambda e: (e["val_acc"], -e["val_loss"]))
    assert logged["selected_epoch"] == best["epoch"]
    # The saved heads are that epoch's: scoring them again gives its validation figures.
    from step_ros.model.multitask import MultiTaskModel
    from step_ros.training.train import HeadSet

    model = MultiTaskModel.from_manifest(trained)
    dataset = load_annotations(csv).filter(split="val")
    backbone_cache = TokenCache.for_backbone(root / "cache", model.backbone)
    val = Split(StreamedTokens(backbone_cache, dataset), label_indices(dataset, trained))
    runtime = Runtime(torch.device("cpu"), workers=0)
    again = validate(HeadSet(dict(model.heads.items())), validation_loader(val, trained, runtime, 8), val.labels,
                     runtime)
    assert again["val_acc"] == pytest.approx(best["val_acc"]) and again["val_loss"] == pytest.approx(best["val_loss"])
    assert (tmp_path / "run" / "train_curve.png").stat().st_size > 0
    last = tmp_path / "run" / "last" / "manifest.yaml"
    if logged["selected_epoch"] != len(epochs):  # the last epoch's heads are kept beside, to compare
        from step_ros.model.multitask import read_head_metadata

        kept = load_manifest(last).heads[0].checkpoint
        assert read_head_metadata(kept)["epoch"] == str(len(epochs))
    else:
        assert not last.exists()
    assert not (tmp_path / "run" / "train_state.safetensors").exists()  # finished: no resume state left


def test_early_stop_ends_when_validation_stops_improving(data, tmp_path):
    root, csv, template = data
    config = TrainConfig(epochs=6, batch_size=8, lr=0.0, early_stop=2)  # lr 0: nothing ever improves
    train_job(template, csv, tmp_path / "run", config, cache_root=root / "cache")
    logged = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert logged["stopped_early"] and len(logged["epochs"]) == 3 and logged["selected_epoch"] == 1
    from step_ros.model.multitask import read_head_metadata

    kept = load_manifest(tmp_path / "run" / "manifest.yaml").heads[0].checkpoint
    last = load_manifest(tmp_path / "run" / "last" / "manifest.yaml").heads[0].checkpoint
    assert read_head_metadata(kept)["epoch"] == "1" and read_head_metadata(last)["epoch"] == "3"


def test_diagnose_warns_about_overfitting_chance_and_no_validation():
    labels = {"task": torch.tensor([0, 1, 2, 3] * 10)}
    split = Split(TokensInRam([torch.zeros(1)] * 40), labels)
    log = [{"epoch": 1, "train_acc/task": 1.0, "val_acc/task": 0.9},
           {"epoch": 2, "train_acc/task": 1.0, "val_acc/task": 0.3}]
    warnings = diagnose(log, 1, ["task"], split, split)
    assert any("overfits: 100.0 % train against 30.0 % validation" in w for w in warnings)
    assert not any("chance" in w for w in warnings)  # the kept epoch (1) is well above 25 %
    log[0]["val_acc/task"] = 0.3
    assert any("is at chance" in w for w in diagnose(log, 1, ["task"], split, split))
    assert any("no validation split" in w for w in diagnose(log, 2, ["task"], split, None))


def _train_args(template, csv, cache, out, *extra):
    return ("train", "--manifest", str(template), "--data", str(csv), "--cache", str(cache), "--out", str(out),
            *extra)


def test_interrupted_training_resumes_to_the_same_heads(data, tmp_path):
    root, csv, template = data
    recipe = ("--epochs", "8", "--batch-size", "5", "--hflip", "--checkpoint-every", "2")
    full = _cli(*_train_args(template, csv, root / "cache", tmp_path / "full", *recipe))
    assert full.returncode == 0, full.stderr
    # Ctrl-C as a terminal sends it: to the whole process group (DataLoader workers included).
    args = [sys.executable, "-m", "step_ros", *_train_args(template, csv, root / "cache", tmp_path / "cut", *recipe)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    state = tmp_path / "cut" / "train_state.safetensors"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command with --resume" in err and state.exists()
    again = _cli(*_train_args(template, csv, root / "cache", tmp_path / "cut", *recipe))
    assert again.returncode == 2 and "unfinished training run" in again.stderr  # never silently restarted
    other = _cli(*_train_args(template, csv, root / "cache", tmp_path / "cut", "--epochs", "8", "--batch-size", "6",
                              "--hflip", "--resume"))
    assert other.returncode == 2 and "batch_size: 5 then, 6 now" in other.stderr
    resumed = _cli(*_train_args(template, csv, root / "cache", tmp_path / "cut", *recipe, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _heads(tmp_path / "full"), _heads(tmp_path / "cut")
    assert all(torch.equal(a[t][k], b[t][k]) for t in a for k in a[t])
    strip = lambda log: [{k: v for k, v in e.items() if k not in ("seconds", "windows_per_s")} for e in log]  # noqa
    la = json.loads((tmp_path / "full" / "train_log.json").read_text())
    lb = json.loads((tmp_path / "cut" / "train_log.json").read_text())
    assert strip(la["epochs"]) == strip(lb["epochs"]) and not state.exists()


# ------------------------------------------------------------------ torchrun


def test_torchrun_ddp_training_equals_one_process(data, tmp_path):
    """SGD on purpose: unlike Adam it is not blind to a wrongly scaled gradient.  Batch 5 over 2
    ranks leaves uneven shares and a short last batch."""
    root, csv, template = data
    recipe = ("--epochs", "3", "--batch-size", "5", "--optimizer", "sgd", "--lr", "0.05", "--workers", "1")
    one = _cli(*_train_args(template, csv, root / "cache", tmp_path / "one", *recipe))
    assert one.returncode == 0, one.stderr
    two = _torchrun(*_train_args(template, csv, root / "cache", tmp_path / "two", *recipe))
    assert two.returncode == 0, two.stdout + two.stderr
    log_one = json.loads((tmp_path / "one" / "train_log.json").read_text())
    log_two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    assert log_two["runtime"]["world_size"] == 2 and log_one["runtime"]["world_size"] == 1
    for a, b in zip(log_one["epochs"], log_two["epochs"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["train_acc/fine_action"] == a["train_acc/fine_action"]
    assert _max_diff(_heads(tmp_path / "one"), _heads(tmp_path / "two")) < 1e-5
    assert two.stdout.count("trained 3 head(s)") == 1  # rank 0 alone reports and writes


def test_torchrun_extract_and_evaluate_match_one_process(data, tmp_path):
    root, csv, template = data
    train_job(template, csv, tmp_path / "run", TrainConfig(epochs=1, batch_size=8), cache_root=root / "cache")
    manifest = tmp_path / "run" / "manifest.yaml"
    two = _torchrun("evaluate", "--manifest", str(manifest), "--data", str(csv), "--cache", str(tmp_path / "c2"),
                    "--out", str(tmp_path / "e2"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("fine_action: top-1 %") == 1  # one report, from rank 0
    # Extraction: the ranks split the videos; each file as one process writes it (up to the
    # rounding of one thread against two).
    extract_job(template, csv, tmp_path / "c1", split="test")
    cache_one, cache_two = next((tmp_path / "c1").iterdir()), next((tmp_path / "c2").iterdir())
    files = sorted(p.name for p in cache_one.glob("*.safetensors"))
    assert files == sorted(p.name for p in cache_two.glob("*.safetensors")) and len(files) == 2 * len(FINE_ACTIONS)
    for name in files:
        torch.testing.assert_close(load_file(str(cache_one / name))["tokens"].float(),
                                   load_file(str(cache_two / name))["tokens"].float(), rtol=1e-3, atol=1e-3)
    # Evaluation: the gathered report equals one process's on the same tokens.
    one = evaluate_job(manifest, csv, tmp_path / "e1", cache_root=tmp_path / "c2", quiet=True)
    report = json.loads((tmp_path / "e2" / "report.json").read_text())
    for task in HEADS:
        assert report["tasks"][task]["orders"] == json.loads(json.dumps(one["tasks"][task]["orders"]))
        assert report["tasks"][task]["confusion"] == one["tasks"][task]["confusion"]
    rows_two = json.loads((tmp_path / "e2" / "predictions.json").read_text())
    rows_one = json.loads((tmp_path / "e1" / "predictions.json").read_text())
    assert [r["video"] for r in rows_two] == [r["video"] for r in rows_one]  # dataset order restored
    for a, b in zip(rows_one, rows_two):
        for task in HEADS:
            assert a[task]["pred"] == b[task]["pred"]
            assert a[task]["confidence"] == pytest.approx(b[task]["confidence"], abs=2e-4)


# ------------------------------------------------------------------ devices


def test_device_and_precision_errors_are_clear():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(RuntimeConfigError, match="needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    if not CUDA:
        with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
        result = _cli("train", "--manifest", "x.yaml", "--data", "x.csv", "--out", "x", "--device", "cuda:0")
        assert result.returncode == 2 and "no CUDA GPU is visible" in result.stderr
        assert "Traceback" not in result.stderr


def test_bf16_autocast_training_on_cpu_runs(data, tmp_path):
    root, csv, template = data
    runtime = Runtime(torch.device("cpu"), precision="bf16", workers=0)
    train_job(template, csv, tmp_path / "run", TrainConfig(epochs=1, batch_size=8), cache_root=root / "cache",
              runtime=runtime)
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["runtime"]["precision"] == "bf16"


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_extract_train_evaluate_match_the_cpu(data, tmp_path, precision):
    root, csv, template = data
    gpu = Runtime(torch.device("cuda", 0), precision=precision, workers=1)
    cpu = Runtime(torch.device("cpu"), workers=0)
    config = TrainConfig(epochs=2, batch_size=8)
    train_job(template, csv, tmp_path / "gpu", config, cache_root=tmp_path / "cg", runtime=gpu)
    train_job(template, csv, tmp_path / "cpu", config, cache_root=tmp_path / "cc", runtime=cpu)
    tolerance = 2e-3 if precision == "fp32" else 5e-2
    assert _max_diff(_heads(tmp_path / "gpu"), _heads(tmp_path / "cpu")) < tolerance
    report = evaluate_job(tmp_path / "gpu" / "manifest.yaml", csv, None, cache_root=tmp_path / "cg", quiet=True,
                          runtime=gpu)
    assert report["tasks"]["fine_action"]["orders"]["normal"]["all"]["n"] == 2 * len(FINE_ACTIONS)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_with_c10d_rendezvous_train_like_one(data, tmp_path):
    """The multi-machine form of the README, with both "machines" on this host: two torchrun
    launchers meet at a c10d rendezvous endpoint and share the cache and output folders."""
    root, csv, template = data
    recipe = ("--epochs", "2", "--batch-size", "6", "--optimizer", "sgd", "--lr", "0.05", "--workers", "0")
    endpoint = f"127.0.0.1:{_free_port()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=step-ros-test", "-m", "step_ros",
              *_train_args(template, csv, root / "cache", tmp_path / "two_nodes", *recipe)]
    nodes = [subprocess.Popen(launch, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    one = _cli(*_train_args(template, csv, root / "cache", tmp_path / "one", *recipe))
    assert one.returncode == 0, one.stderr
    logged = json.loads((tmp_path / "two_nodes" / "train_log.json").read_text())
    assert logged["runtime"]["world_size"] == 2
    assert _max_diff(_heads(tmp_path / "one"), _heads(tmp_path / "two_nodes")) < 1e-5


def test_bench_memory_sampler_sees_a_child_allocation():
    from step_ros.training.bench_data import run_measured

    code = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(0.5)"
    m = run_measured([sys.executable, "-c", code], interval=0.02)
    assert 300 <= m["peak_pss_mib"] < 600 and m["peak_rss_main_mib"] >= 300
    with pytest.raises(RuntimeError, match="benchmark step failed"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"])


def test_corrupt_token_file_is_one_clear_line(data, tmp_path):
    root, csv, template = data
    cache = extract_job(template, csv, tmp_path / "c", split="train")
    victim = sorted(cache.root.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    result = _cli(*_train_args(template, csv, tmp_path / "c", tmp_path / "run", "--epochs", "1", "--workers", "1"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("step-ros train: error: corrupt token file ") and "delete it" in line
    assert victim.name in line and "Traceback" not in result.stderr
