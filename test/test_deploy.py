"""Deployment backends: ONNX export vs PyTorch, ONNX Runtime encoders, the export cache, TensorRT.

The backbone is conftest's tiny DINOv2 (real module layout, seeded random weights); the
TensorRT tests need the ``tensorrt`` package and a CUDA GPU and are skipped without them.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_frames
from step_ros.deploy.backends import BACKENDS, BackendUnavailable, create_encoder, export_key
from step_ros.deploy.export import (
    INPUT_NAME,
    LOGITS_PREFIX,
    OUTPUT_NAME,
    WINDOW_NAME,
    export_backbone,
    export_heads,
    read_sidecar,
)
from step_ros.model.streaming import StreamingEngine

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime backends need onnxruntime (pip extra 'onnx')")


def test_backbone_export_matches_torch(tiny_model, tmp_path):
    backbone = tiny_model.backbone
    result = export_backbone(backbone, tmp_path / "backbone.onnx")
    print(f"backbone ONNX max abs error vs PyTorch: {result.max_abs_error}")
    assert result.max_abs_error[OUTPUT_NAME] < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    s, n, d = backbone.image_size, backbone.num_patches, backbone.dim
    assert (inp.name, inp.shape) == (INPUT_NAME, [1, 3, s, s])
    assert (out.name, out.shape) == (OUTPUT_NAME, [1, 1 + n, d])
    meta = read_sidecar(result.path)
    assert meta["kind"] == "backbone" and meta["image_size"] == s and meta["opset"] == 17
    assert meta["arch"]["hidden_size"] == d and meta["fingerprint"] and meta["versions"]["transformers"]
    assert meta["inputs"][0]["name"] == INPUT_NAME and meta["outputs"][0]["shape"] == [1, 1 + n, d]
    # frames the check never saw
    frame = random_frames(1, 60, 50, seed=7)
    pixels = backbone.preprocess(frame)
    with torch.inference_mode():
        ref = backbone(pixels).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_heads_export_matches_torch(tiny_model, tmp_path):
    result = export_heads(tiny_model, tmp_path / "heads.onnx")
    print(f"heads ONNX max abs error vs PyTorch: {result.max_abs_error}")
    names = [LOGITS_PREFIX + task for task in tiny_model.tasks]
    assert list(result.max_abs_error) == names
    assert max(result.max_abs_error.values()) < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [WINDOW_NAME]
    assert [o.name for o in session.get_outputs()] == names
    window = torch.randn(1, tiny_model.manifest.frames, tiny_model.backbone.num_patches + 1, tiny_model.backbone.dim)
    outs = session.run(names, {WINDOW_NAME: window.numpy()})
    with torch.inference_mode():
        ref = tiny_model(window)
    for task, out in zip(tiny_model.tasks, outs):
        np.testing.assert_allclose(out, ref[task].numpy(), atol=1e-4)
    assert read_sidecar(result.path)["tasks"][tiny_model.tasks[0]]["output"] == names[0]


def test_ort_encoder_matches_torch_through_streaming(tiny_model, tmp_path):
    encoder = create_encoder("onnxruntime", tiny_model.backbone, tmp_path, device="cpu", threads=1)
    info = encoder.describe()
    assert info["backend"] == "onnxruntime" and info["exported"] is True
    assert info["providers"] == ["CPUExecutionProvider"]
    frames = random_frames(15)
    for frame in frames[:3]:
        torch.testing.assert_close(encoder(frame), tiny_model.backbone.encode(frame)[0], atol=1e-4, rtol=1e-4)
    reference = StreamingEngine(tiny_model)
    onnx_engine = StreamingEngine(tiny_model, encode=encoder)
    compared = 0
    for i, frame in enumerate(frames):
        a, b = reference.push(frame, i * 0.1), onnx_engine.push(frame, i * 0.1)
        assert (a is None) == (b is None)
        if a is None:
            continue
        for task in a.tasks:
            assert a.tasks[task].index == b.tasks[task].index
            np.testing.assert_allclose(a.tasks[task].probs, b.tasks[task].probs, atol=1e-4)
        compared += 1
    assert compared >= 3


def test_ort_encoder_batches_through_a_dynamic_batch_graph(tiny_model, tmp_path):
    """Offline callers send many frames per call: one run of a graph with a dynamic batch axis,
    exported on the first batch (never for single frames, which is all a node sends)."""
    encoder = create_encoder("onnxruntime", tiny_model.backbone, tmp_path, device="cpu", threads=1)
    frames = random_frames(5, seed=4)
    singles = torch.stack([encoder(f) for f in frames])
    assert list(tmp_path.glob("*/backbone.batched*.onnx")) == []  # single frames: the batch-1 graph only
    batch = encoder.encode(frames)
    assert [p.name for p in tmp_path.glob("*/backbone.batched*.onnx")] == ["backbone.batched.onnx"]
    meta = read_sidecar(next(tmp_path.glob("*/backbone.batched.onnx")))
    assert meta["batch"] == "dynamic" and meta["inputs"][0]["shape"][0] == "batch"
    assert meta["max_abs_error"][OUTPUT_NAME] <= 1e-4  # its own export check, batched feed included
    assert batch.shape == singles.shape and batch.dtype == torch.float32
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch, tiny_model.backbone.encode(frames), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(encoder.encode(frames[:3]), batch[:3])  # the session is kept; any batch size
    assert encoder.encode(frames[:1]).shape == (1, *batch.shape[1:])


def test_int8_encoder_keeps_one_frame_per_call(tiny_model, tmp_path):
    """Dynamic int8 quantization scales activations by the whole input's range: in a batch a
    frame's tokens would depend on its neighbours.  So batches run frame by frame, and equal it."""
    encoder = create_encoder("onnxruntime-int8", tiny_model.backbone, tmp_path, threads=1)
    frames = random_frames(3, seed=4)
    torch.testing.assert_close(encoder.encode(frames), torch.stack([encoder(f) for f in frames]))
    assert list(tmp_path.glob("*/backbone.batched*.onnx")) == []


def test_torch_encoder_encodes_a_batch_in_one_forward(tiny_model):
    encoder = create_encoder("torch", tiny_model.backbone, device="cpu")
    frames = random_frames(4, seed=5)
    torch.testing.assert_close(encoder.encode(frames), tiny_model.backbone.encode(frames))
    torch.testing.assert_close(encoder.encode(frames)[2], encoder(frames[2]), atol=1e-5, rtol=1e-5)


def test_export_cache_reused_and_invalidated(tiny_model, tmp_path):
    backbone = tiny_model.backbone
    first = create_encoder("onnxruntime", backbone, tmp_path, device="cpu")
    path = first.onnx_path
    stamp = path.stat().st_mtime_ns
    second = create_encoder("onnxruntime", backbone, tmp_path, device="cpu")
    assert second.onnx_path == path and second.describe()["exported"] is False
    assert path.stat().st_mtime_ns == stamp  # not rewritten
    forced = create_encoder("onnxruntime", backbone, tmp_path, device="cpu", force_engine_update=True)
    assert forced.onnx_path == path and forced.describe()["exported"] is True

    changed = copy.deepcopy(backbone)
    with torch.no_grad():
        weight = changed.model.encoder.layer[0].mlp.fc1.weight
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    assert export_key(changed) != export_key(backbone)
    third = create_encoder("onnxruntime", changed, tmp_path, device="cpu")
    assert third.describe()["exported"] is True and third.onnx_path != path
    frame = random_frames(1, seed=3)[0]
    torch.testing.assert_close(third(frame), changed.encode(frame)[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(third(frame), first(frame), atol=1e-3)
    assert len(list(tmp_path.glob("*/backbone.onnx"))) == 2


def test_unknown_backend_names_valid_ones(tiny_model):
    with pytest.raises(ValueError) as err:
        create_encoder("openvino", tiny_model.backbone)
    for name in BACKENDS:
        assert name in str(err.value)


def test_missing_dependency_names_the_extra(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(BackendUnavailable, match=r"step_ros\[onnx\]"):
        create_encoder("onnxruntime", tiny_model.backbone, tmp_path)
    monkeypatch.undo()
    try:
        import tensorrt  # noqa: F401

        have_trt = torch.cuda.is_available()
    except ImportError:
        have_trt = False
    if not have_trt:
        with pytest.raises(BackendUnavailable, match=r"step_ros\[tensorrt\]") as err:
            create_encoder("tensorrt", tiny_model.backbone, tmp_path)
        assert "GPU" in str(err.value)
        print(f"tensorrt backend here: {err.value}")


def test_torch_encoder_is_the_backbone(tiny_model):
    encoder = create_encoder("torch", tiny_model.backbone, device="cpu")
    frame = random_frames(1)[0]
    torch.testing.assert_close(encoder(frame), tiny_model.backbone.encode(frame)[0])
    assert encoder.describe()["device"] == "cpu"


def test_int8_encoder_runs_and_is_correlated(tiny_model, tmp_path):
    encoder = create_encoder("onnxruntime-int8", tiny_model.backbone, tmp_path, threads=1)
    assert encoder.onnx_path.name == "backbone.int8.onnx"
    assert json.loads(encoder.onnx_path.with_name("backbone.int8.onnx.json").read_text())["quantization"]
    frames = random_frames(3, seed=5)
    got = encoder.encode(frames)
    ref = tiny_model.backbone.encode(frames)
    corr = np.corrcoef(got.flatten().numpy(), ref.flatten().numpy())[0, 1]
    err = float((got - ref).abs().max())
    print(f"int8 tokens vs fp32: correlation {corr:.5f}, max abs error {err:.3g}")
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert corr > 0.9


# --------------------------------------------------------------------------- TensorRT


def _require_tensorrt():
    if not torch.cuda.is_available():
        reason = "TensorRT needs an NVIDIA GPU with CUDA; none on this machine"
        print(reason)
        pytest.skip(reason)
    return pytest.importorskip("tensorrt", reason="TensorRT tests need the tensorrt package (pip extra 'tensorrt')")


def test_tensorrt_engine_build_cache_and_rebuild(tiny_model, tmp_path):
    trt = _require_tensorrt()
    backbone = tiny_model.backbone
    encoder = create_encoder("tensorrt", backbone, tmp_path, precision="fp16")
    info = encoder.describe()
    assert info["built"] is True and info["precision"] == "fp16"
    engine = encoder.runner.engine_path
    major, minor = torch.cuda.get_device_capability()
    assert engine.parent == Path(info["onnx"]).parent  # cached beside the ONNX graph
    assert f"trt{trt.__version__}" in engine.name and f"sm{major}{minor}" in engine.name and ".fp16." in engine.name
    meta = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert meta["tensorrt_version"] == trt.__version__ and meta["precision"] == "fp16"
    assert meta["compute_capability"] == f"{major}.{minor}" and meta["gpu_name"] == torch.cuda.get_device_name()
    assert meta["onnx_sha256"] == read_sidecar(info["onnx"])["onnx_sha256"]

    frames = random_frames(3, seed=9)
    for frame in frames:
        ref = backbone.encode(frame)[0]
        got = encoder(frame)
        err = float((got - ref).abs().max())
        print(f"TensorRT fp16 vs torch fp32: max abs error {err:.3g}")
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)

    stamp = engine.stat().st_mtime_ns
    again = create_encoder("tensorrt", backbone, tmp_path, precision="fp16")
    assert again.describe()["built"] is False and engine.stat().st_mtime_ns == stamp
    rebuilt = create_encoder("tensorrt", backbone, tmp_path, precision="fp16", force_engine_update=True)
    assert rebuilt.describe()["built"] is True and rebuilt.runner.engine_path == engine
    assert engine.stat().st_mtime_ns != stamp
    fp32 = create_encoder("tensorrt", backbone, tmp_path, precision="fp32")
    assert fp32.runner.engine_path != engine and ".fp32." in fp32.runner.engine_path.name
    torch.testing.assert_close(fp32(frames[0]), backbone.encode(frames[0])[0], atol=1e-3, rtol=1e-3)


def test_baseline_engine_brings_its_own_kernels(tmp_path):
    """`--baseline-engine` with a fast_kernels.py beside the engine runs that engine on those
    kernels (an earlier revision's pair), and leaves today's engine its own."""
    import numpy as np

    from step_ros.deploy.bench_heads import load_engine_module
    from step_ros.model import fast_kernels, fast_step
    from step_ros.model.heads import StepHead

    for name, module in (("fast_step.py", fast_step), ("fast_kernels.py", fast_kernels)):
        (tmp_path / name).write_text(Path(module.__file__).read_text())
    before = load_engine_module(tmp_path / "fast_step.py")
    assert before.make_kernels is not fast_kernels.make_kernels
    assert before.make_kernels.__module__.endswith("_kernels")
    assert sys.modules["step_ros.model.fast_kernels"] is fast_kernels and fast_step.make_kernels is fast_kernels.make_kernels
    head = StepHead(32, 3, 4, 16, num_heads=2).eval()
    runner, tokens = before.FastStepRunner({"a": head}, kernels="torch"), torch.randn(4, 17, 32)
    for i in range(4):
        runner.add_frame(i, tokens[i])
    torch.testing.assert_close(runner.predict(tokens, np.arange(4))["a"], head(tokens[None])[0], rtol=1e-5, atol=1e-6)


def test_bench_command_small_configuration(tmp_path, capsys):
    """`step-ros bench` end to end on a tiny configuration: every row present, ratios to baselines."""
    from step_ros.cli import main
    from step_ros.model import fast_step

    before = tmp_path / "fast_step_before.py"  # an "earlier engine": the current one, as a file
    before.write_text(Path(fast_step.__file__).read_text())
    assert main(["bench", "--arch", "dinov2_vitt14", "--image-size", "56", "--frames", "4", "--frame-size", "64",
                 "--repeat", "2", "--clip-repeat", "1", "--threads", "1", "--out", str(tmp_path), "--no-sweep",
                 "--extra-arch", "--baseline-engine", str(before)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert any(n.startswith("backbone torch") for n in names) and any("onnxruntime" in n for n in names)
    from step_ros.model.native_kernels import amx_available

    variants = ["before (fast_step_before.py)", "before (fast_step_before.py), native kernels, bf16 blocks",
                "torch kernels", "torch kernels, bf16 blocks", "native kernels", "native kernels, bf16 blocks",
                "onnxruntime kernels", "auto kernels"]
    if amx_available():  # the AMX lever on its own
        variants.append("native kernels, bf16 blocks, no AMX")
    for variant in variants:
        stream = next(r for r in result["rows"] if r["name"] == f"streaming: 1 backbone pass + 3 fast heads, {variant}")
        assert stream["backbone_calls_per_new_frame"] == 1 and stream["ratio_to_baseline"] > 0
        assert stream["backbone_passes"] > 0 and stream["fallbacks"] == 0
        heads = next(r for r in result["rows"] if r["name"] == f"heads only: fast STEP engine, {variant} x3")
        assert heads["max_abs_diff_vs_sdpa"] < 1e-4 and heads["ms_add_frame"] > 0 and heads["ms_predict"] > 0
        if not variant.startswith("before"):
            assert heads["kernels"] == stream["kernels"] == variant.split()[0].replace("auto", "torch")  # 16 tokens
    assert sum(n.startswith("pass over 1 head's blocks") for n in names) == 5  # fp32 x2, fp16, bf16 x2
    assert any(n.startswith("pass over 1 head's blocks: bf16, step_ros kernel") for n in names)
    memory = {r["name"]: r.get("memory_mb") for r in result["rows"]}
    bf16, f32 = (memory[f"heads only: fast STEP engine, {v} x3"] for v in ("torch kernels, bf16 blocks", "torch kernels"))
    assert bf16 < f32  # the blocks, in half the bytes
    assert any("token_pool 2 (approximate)" in n for n in names)  # 4 x 4 grid: pools to 2 x 2
    assert (tmp_path / "bench_latency.png").stat().st_size > 0
    assert "step-ros bench" in capsys.readouterr().out


def test_gemm_peak_is_the_best_library_and_int8_is_separate():
    """Fractions of peak are taken against the fastest fp32 GEMM measured (PyTorch or ONNX
    Runtime) so that no row can exceed 100 % because one library is slow on this CPU."""
    from step_ros.deploy.peak import describe_peaks, measure_gemm_peaks

    peaks = measure_gemm_peaks(size=128, repeats=2)
    assert peaks["torch"] > 0 and peaks["onnxruntime"] > 0 and peaks["int8"] > 0
    assert peaks["fp32"] == max(peaks["torch"], peaks.get("onednn", 0.0), peaks["onnxruntime"])
    assert "best of torch" in describe_peaks(peaks)


# --------------------------------------------------------------------------- NaN-proof parity checks


def _with_nan(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of ``module`` with one NaN planted in parameter ``name``: every output turns NaN."""
    broken = copy.deepcopy(module)
    with torch.no_grad():
        dict(broken.named_parameters())[name].view(-1)[0] = float("nan")
    return broken


def test_parity_helpers_never_read_nan_as_exact():
    from step_ros.deploy.export import max_abs_error, within, worst_error

    a = np.zeros(4)
    assert max_abs_error(a, a) == 0.0 and within(0.0, 1e-6)
    nan = np.array([0.0, np.nan, 0.0, 0.0])
    assert np.isnan(max_abs_error(nan, a)) and np.isnan(max_abs_error(a, torch.tensor(nan)))
    assert np.isnan(max_abs_error(np.array([np.inf]), np.array([np.inf])))  # inf - inf is not "0 apart"
    assert max(0.0, float("nan")) == 0.0  # why a running max() lost it
    assert np.isnan(worst_error([0.0, float("nan"), 1.0])) and worst_error([0.5, 0.25]) == 0.5
    assert not within(float("nan"), 1e9)


def test_backbone_export_with_a_nan_fails_its_check(tiny_model, tmp_path):
    from step_ros.deploy.export import ExportError

    broken = _with_nan(tiny_model.backbone, "model.encoder.layer.0.mlp.fc1.weight")
    with pytest.raises(ExportError, match="non-finite"):
        export_backbone(broken, tmp_path / "nan.onnx", tolerance=1e-2, verbose=False)
    # The ONNX Runtime backend checks its export the same way, so it refuses to start.
    with pytest.raises(ExportError, match="non-finite"):
        create_encoder("onnxruntime", broken, tmp_path, device="cpu")


def test_heads_export_with_a_nan_fails_its_check(tiny_model, tmp_path):
    from step_ros.deploy.export import ExportError

    model = copy.deepcopy(tiny_model)
    task = model.tasks[0]
    model.heads[task] = _with_nan(model.heads[task], "classifier.weight")
    with pytest.raises(ExportError, match="non-finite"):
        export_heads(model, tmp_path / "heads.onnx", tolerance=1e-3, verbose=False)


def test_encoder_comparison_with_a_nan_is_nan(tiny_model):
    from step_ros.deploy.backends import compare_to_torch
    from step_ros.deploy.export import within

    encoder = create_encoder("torch", _with_nan(tiny_model.backbone, "model.embeddings.cls_token"), device="cpu")
    error = compare_to_torch(encoder, tiny_model.backbone)
    assert np.isnan(error) and not within(error, 1.0)


# --------------------------------------------------------------------------- supported versions


def test_tensorrt_versions_outside_the_supported_range_are_refused():
    from step_ros.deploy.tensorrt import TensorRTUnavailable, builder_flags, check_tensorrt_version, onnx_opset_for

    assert check_tensorrt_version("10.3.0.30") == (10, 3) and check_tensorrt_version("8.6.2.3") == (8, 6)
    with pytest.raises(TensorRTUnavailable, match="8.6 or newer.*JetPack 5"):
        check_tensorrt_version("8.5.2.2")
    with pytest.raises(TensorRTUnavailable, match="TensorRT 11 removed .*FP16"):
        check_tensorrt_version("11.0.0")
    assert onnx_opset_for("8.6.2") == 16 and onnx_opset_for("10.3.0") == 17
    assert builder_flags("fp32") == () and builder_flags("fp16") == ("FP16", "TF32")  # fp32 without TF32


def test_unsupported_library_combinations_are_named():
    from step_ros.support import check_environment, problems

    check_environment()  # this machine's pins are supported
    assert problems((3, 10), "2.13.0+cpu", "5.23.0") == []
    assert problems((3, 10), "2.3.0+nv24.05", "4.50.0") == []  # JetPack 6.0's torch with transformers 4
    found = problems((3, 8), "2.1.0a0+41361538.nv23.06", "5.1.0")
    assert len(found) == 3
    assert "Python 3.8" in found[0] and "torch 2.1.0a0" in found[1] and "'transformers>=4.47,<5'" in found[2]


def test_export_uses_the_torchscript_exporter_on_any_torch(tiny_model, tmp_path):
    import inspect

    has_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    result = export_backbone(tiny_model.backbone, tmp_path / "b.onnx", opset=16, verbose=False)
    assert read_sidecar(result.path)["opset"] == 16 and result.max_abs_error[OUTPUT_NAME] < 1e-4
    print(f"torch {torch.__version__}: torch.onnx.export has a dynamo argument: {has_dynamo}")


def test_released_backbone_keeps_its_identity_and_refuses_to_encode(tiny_model):
    backbone = copy.deepcopy(tiny_model.backbone)
    fingerprint = backbone.fingerprint
    backbone.release_weights()
    assert backbone.fingerprint == fingerprint and backbone.num_patches == tiny_model.backbone.num_patches
    assert all(p.device.type == "meta" for p in backbone.model.parameters())
    with pytest.raises(RuntimeError, match="released"):
        backbone.encode(random_frames(1))


def test_engine_key_tells_orin_modules_and_builder_flags_apart():
    from dataclasses import replace

    from step_ros.deploy.tensorrt import EngineKey, builder_flags

    key = EngineKey(onnx_sha256="ab" * 32, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                    sm_count=16, precision="fp16", build_flags=builder_flags("fp16"), workspace_bytes=1 << 30)
    names = {key.filename("backbone"), replace(key, sm_count=8).filename("backbone"),
             replace(key, precision="fp32", build_flags=builder_flags("fp32")).filename("backbone"),
             replace(key, build_flags=("FP16",)).filename("backbone")}
    assert len(names) == 4  # an Orin NX and an AGX (same name and sm87) never share an engine
    assert key.filename("backbone").startswith("backbone.fp16.trt10.3.0.orin.sm87.")
