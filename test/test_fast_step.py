"""Exact fast STEP engine: same logits as the StepHead forward, per new frame, past the wrap."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, random_frames, tiny_manifest_dict
from step_ros.model import fast_kernels, native_kernels
from step_ros.model.fast_step import FastStepRunner, fast_path_unsupported, reference_step_logits
from step_ros.model.heads import AttentiveHead, StepHead, pool_patch_grid
from step_ros.model.streaming import ReferenceRunner, StreamingEngine

D, N_TOK, T, H = 64, 9, 5, 2
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to thread-barrier waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_heads(seed: int = 0, qk_scale: float = 1.0, extra: dict | None = None) -> dict[str, torch.nn.Module]:
    """Three STEP heads (different class counts) and one attentive head, on D=64, n=9, T=5.

    ``qk_scale`` multiplies Wq, Wk (and the PE and CLS token by 10 when > 1): trained-looking,
    peaked attention that stresses the log-domain bookkeeping."""
    torch.manual_seed(seed)
    heads: dict[str, torch.nn.Module] = {
        f"step{i}": StepHead(D, 3 + i, T, N_TOK, num_heads=H) for i in range(3)
    }
    heads["attentive"] = AttentiveHead(D, 4, T, N_TOK, num_heads=H)
    for task, opts in (extra or {}).items():
        heads[task] = StepHead(D, 3, T, N_TOK, num_heads=H, **opts)
    with torch.no_grad():
        for head in heads.values():
            if isinstance(head, StepHead):
                head.attn.qkv.bias.normal_(0, 0.1)
                if qk_scale != 1.0:
                    head.attn.qkv.weight[: 2 * D] *= qk_scale
                    if head.pe in ("learnable", "hybrid"):
                        head.temporal_pe.mul_(10)
                    if head.global_cls is not None:
                        head.global_cls.mul_(10)
    return {k: v.eval() for k, v in heads.items()}


def reference(heads, window):
    with torch.inference_mode():
        return {task: head(window[None])[0] for task, head in heads.items()}


def assert_same(out, ref):
    assert set(out) == set(ref)
    for task in ref:
        torch.testing.assert_close(out[task], ref[task], rtol=RTOL, atol=ATOL, msg=task)


def stream(runner, heads, frames, first_id=0, order=None):
    """Feed frames one by one; compare every complete window's prediction to the reference."""
    checked = 0
    for i in range(len(frames)):
        runner.add_frame(first_id + i, frames[i])
        if i >= T - 1:
            ids = np.arange(i - T + 1, i + 1)
            if order is not None:
                ids = ids[order]
            window = frames[ids]
            assert_same(runner.predict(window, ids + first_id), reference(heads, window))
            checked += 1
    return checked


def test_naive_reference_equals_step_forward():
    heads = make_heads(qk_scale=5.0, extra={"after": {"pe_position": "after"}, "full": {"block": "full"}})
    window = torch.randn(2, T, 1 + N_TOK, D)
    for head in heads.values():
        if isinstance(head, StepHead):
            with torch.inference_mode():
                torch.testing.assert_close(reference_step_logits(head, window), head(window), rtol=RTOL, atol=ATOL)
                torch.testing.assert_close(reference_step_logits(head, window[0]), head(window[:1])[0])


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none visible to PyTorch on this machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qk_scale", [1.0, 5.0])
def test_fast_equals_step_forward_over_a_stream_and_after_reset(qk_scale, device):
    heads = {k: h.to(device) for k, h in make_heads(qk_scale=qk_scale).items()}
    runner = FastStepRunner(heads)
    assert runner.fast_tasks == ["step0", "step1", "step2"]  # batched in one group
    assert len(runner.groups) == 1 and "attentive" in runner.slow_tasks
    frames = torch.randn(3 * T + 2, 1 + N_TOK, D).to(device)
    assert stream(runner, heads, frames) == 2 * T + 3  # well past the cache's wrap point
    assert len(runner._order) == T  # frames leaving the window are evicted
    runner.reset()
    assert stream(runner, heads, torch.randn(T + 2, 1 + N_TOK, D).to(device), first_id=1000) == 3
    assert runner.fallbacks == 0 and runner.reference_predictions == 0


@pytest.mark.parametrize("device", DEVICES)
def test_window_order_does_not_matter_to_the_cache(device):
    """Blocks are keyed by frame, not position: a reversed or shuffled window is exact too."""
    heads = {k: h.to(device) for k, h in make_heads(qk_scale=3.0).items()}
    runner = FastStepRunner(heads)
    frames = torch.randn(2 * T, 1 + N_TOK, D).to(device)
    stream(runner, heads, frames, order=np.arange(T)[::-1])
    ids = np.arange(T, 2 * T)[np.random.RandomState(0).permutation(T)]
    window = frames[torch.from_numpy(ids).to(device)]
    assert_same(runner.predict(window, ids), reference(heads, window))
    assert runner.fallbacks == 0


def test_heads_with_different_attention_head_counts_form_groups():
    torch.manual_seed(1)
    heads = {"h1": StepHead(D, 3, T, N_TOK, num_heads=1).eval(), "h4": StepHead(D, 5, T, N_TOK, num_heads=4).eval()}
    runner = FastStepRunner(heads)
    assert len(runner.groups) == 2
    stream(runner, heads, torch.randn(2 * T, 1 + N_TOK, D))


def test_token_pooled_heads_are_exact_for_their_own_forward():
    """token_pool=2 is a cheaper model (2 x 2 patch averages); the fast engine computes *that*
    model exactly, in its own group beside unpooled heads."""
    torch.manual_seed(2)
    n = 16  # a 4 x 4 grid
    heads = {"full": StepHead(D, 3, T, n, num_heads=H).eval(),
             "pooled": StepHead(D, 4, T, n, num_heads=H, token_pool=2).eval(),
             "pooled4": StepHead(D, 5, T, n, num_heads=H, token_pool=4).eval()}
    runner = FastStepRunner(heads)
    assert sorted(g.pool for g in runner.groups) == [1, 2, 4] and not runner.slow_tasks
    frames = torch.randn(2 * T + 1, 1 + n, D)
    assert stream(runner, heads, frames) == T + 2
    assert runner.groups[[g.pool for g in runner.groups].index(2)].n == 4
    assert runner.memory_bytes() < FastStepRunner({"full": heads["full"]}).memory_bytes(n) * 3
    with pytest.raises(ValueError, match="token_pool 3"):
        StepHead(D, 3, T, n, token_pool=3)
    with pytest.raises(ValueError, match="tokens='patch'"):
        StepHead(D, 3, T, n, token_pool=2, tokens="both")


def test_pool_patch_grid_averages_neighbourhoods():
    from step_ros.model.heads import pool_patch_grid

    grid = torch.arange(16.0).reshape(1, 16, 1)  # row-major 4 x 4
    assert pool_patch_grid(grid, 2)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_patch_grid(grid, 1) is grid
    with pytest.raises(ValueError, match="square patch grid"):
        pool_patch_grid(torch.zeros(1, 12, 1), 2)


@pytest.mark.parametrize("other", ["onnxruntime", "native"])
@pytest.mark.parametrize("qk_scale", [1.0, 40.0])
def test_kernel_sets_agree(qk_scale, other):
    """The kernel implementations (fast_kernels.py) give PyTorch's predictions, exact rows
    included, and each equals the reference forward."""
    if other == "onnxruntime":
        pytest.importorskip("onnxruntime")
    heads = make_heads(qk_scale=qk_scale)
    frames = torch.randn(2 * T, 1 + N_TOK, D)
    runners = {k: FastStepRunner(heads, kernels=k) for k in ("torch", other)}
    assert {k: r.kernels for k, r in runners.items()} == {"torch": "torch", other: other}
    for k, runner in runners.items():
        assert stream(runner, heads, frames, order=np.arange(T)[::-1].copy()) == T + 1
        assert runner.fallbacks == 0
    ids = np.arange(T, 2 * T)
    a, b = (r.predict(frames[ids], ids) for r in runners.values())
    for task in a:
        torch.testing.assert_close(a[task], b[task], rtol=1e-5, atol=1e-6)
    assert runners["torch"].exact_rows == runners[other].exact_rows
    for runner in runners.values():  # a count kept as frames come: other threads read it without tensor work
        assert runner.exact_rows == sum(int(g.exact.sum()) for g in runner.groups)
        assert (runner.exact_rows > 0) == (qk_scale > 1)


@pytest.mark.parametrize("kernels", ["torch", "onnxruntime", "native"])
def test_sharp_attention_leaves_no_denormals_in_the_caches(kernels):
    """Huge tokens put most ``exp`` arguments far below -87.  Below that PyTorch's exp leaves its
    fast path and results turn denormal, each a microcode assist in every later product: three
    ViT-S heads took 964 instead of 101 ms per frame at token scale 10.  The engine floors every
    exp argument (fast_kernels.EXP_FLOOR), so the blocks, the positional factors and the row
    weights hold normal numbers (or exact zeros), and the predictions still equal a float64
    forward."""
    if kernels == "onnxruntime":
        pytest.importorskip("onnxruntime")
    heads = {k: h for k, h in make_heads(qk_scale=5.0).items() if k.startswith("step")}
    runner = FastStepRunner(heads, kernels=kernels)
    torch.manual_seed(2)
    frames = torch.randn(2 * T, 1 + N_TOK, D) * 10  # ~80 % of the block entries under 1e-30, ~9 % exact rows
    tiny = torch.finfo(torch.float32).tiny
    for i in range(len(frames)):
        runner.add_frame(i, frames[i])
        if i < T - 1:
            continue
        ids = np.arange(i - T + 1, i + 1)
        out = runner.predict(frames[ids], ids)
        with torch.inference_mode():
            for task, head in heads.items():
                truth = head.double()(frames[ids][None].double())[0]
                head.float()
                torch.testing.assert_close(out[task].double(), truth, rtol=1e-4, atol=1e-4 * truth.abs().max().item())
        for g in runner.groups:
            E = g.E.masked_fill(g.exact[..., None], 1.0)  # exact rows hold logits, not weights
            for name, t in (("E", E), ("U", g.U), ("r'", g.r_buf)):
                denormal = (t != 0) & (t.abs() < tiny)
                assert not bool(denormal.any()), f"{name}: {int(denormal.sum())} denormal values"
            assert float(E.min()) < 1e-30  # the floor was reached: sharp enough to have mattered
    assert runner.fallbacks == 0


def run_python(code: str, *args: str) -> str:
    """stdout of ``code`` in a fresh interpreter: the denormal flag is per thread and set once."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_flush_denormals_reaches_the_threads_started_after_it():
    """FTZ/DAZ set first thing (as the command line and the node do) holds in PyTorch's OpenMP
    workers too, which copy the flag when the first parallel op starts them, and survives the
    first ONNX Runtime session; set later it holds only in the calling thread.  1e-20 * 1e-20 is
    a denormal, flushed to 0."""
    pytest.importorskip("onnxruntime")
    code = """
import sys, torch
from step_ros.model.device import flush_denormals
if sys.argv[1] == "first":
    assert flush_denormals()
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-20)
before = int((x * 1e-20).count_nonzero())  # the product runs on both threads
if sys.argv[1] == "late":
    flush_denormals()
else:  # the process's first ONNX Runtime session sets the creating thread's mode: it must keep it
    from step_ros.deploy.peak import onnxruntime_gemm_gflops
    onnxruntime_gemm_gflops(size=64, repeats=1)
print(before, int((x * 1e-20).count_nonzero()))
"""

    def run(mode: str) -> list[int]:
        return [int(v) for v in run_python(code, mode).split()]

    assert run("first") == [0, 0]
    before, after = run("late")
    assert before == 1 << 20 and 0 < after < 1 << 20  # late: the main thread's share only


def test_a_filling_window_has_no_exact_rows():
    """Blocks against empty slots are made (and never read) while the window fills: they must
    not be taken for sharp rows (they were, and a node then spent seconds per frame)."""
    runner = FastStepRunner(make_heads())
    frames = torch.randn(T, 1 + N_TOK, D)
    for i in range(T):
        runner.add_frame(i, frames[i])
        assert runner.exact_rows == 0, f"after {i + 1} frames"


def test_kernels_are_validated():
    heads = make_heads()
    with pytest.raises(ValueError, match="kernels must be one of"):
        FastStepRunner(heads, kernels="mkl")
    runner = FastStepRunner(heads, kernels="auto")
    runner.add_frame(0, torch.randn(1 + N_TOK, D))
    assert runner.kernels == "torch"  # N_TOK is under AUTO_MIN_TOKENS: nothing to measure
    assert runner.kernel_timings == {}


def test_auto_kernels_measure_each_and_keep_the_fastest(monkeypatch, log_records):
    """Which kernels are faster depends on the CPU (DECISIONS 35, 38): ``auto`` times those that
    run here at the first frame, keeps the fastest and says so; the timing pass leaves no trace
    in the results."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(fast_kernels, "AUTO_MIN_TOKENS", 1)
    records = log_records("step_ros.model.fast_step", logging.INFO)
    heads = make_heads()
    runner = FastStepRunner(heads, kernels="auto")
    assert runner.kernels == "auto"  # not chosen before a frame gives the token count
    frames = torch.randn(2 * T, 1 + N_TOK, D)
    assert stream(runner, heads, frames) == T + 1
    timings = runner.kernel_timings
    expected = {"torch", "onnxruntime"} | ({"native"} if native_kernels.fused_create_available(T) else set())
    assert set(timings) == expected and all(t > 0 for t in timings.values())
    assert runner.kernels == min(timings, key=timings.get)
    assert any(f"kernels auto -> {runner.kernels}" in r.getMessage() for r in records)


def test_non_default_step_config_uses_reference_forward(log_records):
    extra = {"after": {"pe_position": "after"}, "tokwise": {"pe_scope": "token"}, "nocls": {"global_cls": False},
             "both": {"tokens": "both"}, "full": {"block": "full"}}
    heads = make_heads(extra=extra)
    records = log_records("step_ros.model.fast_step", logging.INFO)
    runner = FastStepRunner(heads)
    assert set(runner.slow_tasks) == {"attentive", *extra}
    for task in extra:
        assert fast_path_unsupported(heads[task]) is not None
        assert sum(task in r.getMessage() for r in records) == 1  # said once, by name
    stream(runner, heads, torch.randn(2 * T, 1 + N_TOK, D))
    # sinusoidal / hybrid frame-wise PE before attention is the same algebra: fast path
    sin = StepHead(D, 3, T, N_TOK, num_heads=H, pe="hybrid").eval()
    none = StepHead(D, 3, T, N_TOK, num_heads=H, pe="none").eval()
    both = {"sin": sin, "none": none}
    runner = FastStepRunner(both)
    assert runner.fast_tasks == ["sin", "none"]
    stream(runner, both, torch.randn(2 * T, 1 + N_TOK, D))


@pytest.mark.parametrize("qk_scale, token_scale", [(1.0, 1.0), (1.0, 3.0), (1.0, 10.0), (5.0, 10.0), (40.0, 1.0),
                                                    (40.0, 10.0), (5.0, 30.0)])
@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_no_fallback_at_any_logit_spread(qk_scale, token_scale, kernels):
    """Sharp heads and huge tokens: no fallback, and the error against a float64 forward stays
    at the float32 SDPA forward's own (exact rows carry what the factored form cannot)."""
    heads = {k: h for k, h in make_heads(qk_scale=qk_scale).items() if k.startswith("step")}
    runner = FastStepRunner(heads, kernels=kernels)
    torch.manual_seed(1)
    frames = torch.randn(3 * T, 1 + N_TOK, D) * token_scale
    worst = {"fast": 0.0, "sdpa": 0.0}
    exact_rows = 0
    for i in range(len(frames)):
        runner.add_frame(i, frames[i])
        if i < T - 1:
            continue
        ids = np.arange(i - T + 1, i + 1)
        ids = ids[::-1].copy() if i % 2 else ids  # reversed windows too
        window = frames[ids]
        out = runner.predict(window, ids)
        exact_rows = max(exact_rows, runner.exact_rows)
        with torch.inference_mode():
            for task, head in heads.items():
                truth = head.double()(window[None].double())[0]
                sdpa = head.float()(window[None])[0]
                scale = max(1.0, truth.abs().max().item())
                worst["fast"] = max(worst["fast"], (out[task].double() - truth).abs().max().item() / scale)
                worst["sdpa"] = max(worst["sdpa"], (sdpa.double() - truth).abs().max().item() / scale)
    print(f"qk x{qk_scale:g}, tokens x{token_scale:g}: exact rows {exact_rows}, max |dlogit| / max(1, |logit|): "
          f"fast {worst['fast']:.1e}, fp32 SDPA {worst['sdpa']:.1e}")
    assert runner.fallbacks == 0 and runner.reference_predictions == 0
    assert worst["fast"] <= max(1e-5, 10 * worst["sdpa"])
    if qk_scale >= 40:
        assert exact_rows > 0  # the log-domain rows were exercised
    if qk_scale == 1.0 and token_scale <= 3:
        assert exact_rows == 0  # ordinary heads never need them


def test_non_finite_tokens_use_the_reference_forward_and_are_counted(log_records):
    heads = make_heads()
    runner = FastStepRunner(heads)
    records = log_records("step_ros.model.fast_step", logging.INFO)
    frames = torch.randn(T + 1, 1 + N_TOK, D)
    frames[T, 3, 5] = float("nan")
    for i in range(T + 1):
        runner.add_frame(i, frames[i])
    ids = np.arange(1, T + 1)
    out = runner.predict(frames[ids], ids)
    assert runner.fallbacks == 1 and runner.fallback_reasons == {"non-finite": 1}
    assert all(torch.isnan(v).all() for v in out.values())  # what the reference forward gives
    assert any("non-finite" in r.getMessage() for r in records)
    ids = np.arange(0, T)  # the NaN frame left the window: the fast path again
    assert_same(runner.predict(frames[ids], ids), reference(heads, frames[ids]))
    assert runner.fallbacks == 1


def test_incomplete_and_unseen_windows():
    heads = make_heads()
    runner = FastStepRunner(heads)
    frames = torch.randn(T, 1 + N_TOK, D)
    for i in range(2):
        runner.add_frame(i, frames[i])
    padded = torch.cat([frames[:1].expand(T - 2, -1, -1), frames[:2]])  # front repeats the oldest
    assert_same(runner.predict(padded, np.arange(2)), reference(heads, padded))
    assert runner.reference_predictions == 1
    # frames never passed to add_frame are cached from the window itself
    ids = np.arange(100, 100 + T)
    assert_same(runner.predict(frames, ids), reference(heads, frames))
    assert sorted(runner._order) == ids.tolist()


def split_score_bound(head, window) -> float:
    """The AMX block creation's extra error on a content score ``S = a . b``:
    ``3 * 2^-18 max sum_i |a_i b_i|`` over the window's query/key pairs (three bfloat16 products
    of two-piece splits; :mod:`step_ros.model.native_kernels`)."""
    with torch.inference_mode():
        dim, h = head.attn.qkv.in_features, head.attn.num_heads
        d = dim // h
        w, b = head.attn.qkv.weight.double(), head.attn.qkv.bias.double()
        pe = head.positional()
        pe = torch.zeros(head.frames, dim, dtype=torch.float64) if pe is None else pe.double().reshape(-1, dim)
        c_bar = ((pe @ w[:dim].T + b[:dim]) / math.sqrt(d)).mean(0)  # folded into the content query
        e = torch.cat([pool_patch_grid(frame, head.token_pool) for frame in window[:, 1:].double()])
        a = (e @ w[:dim].T / math.sqrt(d) + c_bar).reshape(-1, h, d).transpose(0, 1).abs()
        k = (e @ w[dim:2 * dim].T).reshape(-1, h, d).transpose(0, 1).abs()
        return 3 * 2.0**-18 * float((a @ k.transpose(1, 2)).max())


def bf16_logit_bound(head, window, split: bool = False):
    """How far bfloat16 blocks may move each logit: every attention weight within a relative 2^-8
    of the exact one moves the mean attention output by at most ``2^-8 max_l |v_l|`` per channel
    (the weights of a query sum to 1), and the logits by ``|W_cls W_proj|`` times that.
    ``split``: blocks made by the AMX tile unit, whose score error ``delta``
    (:func:`split_score_bound`) moves each weight by a relative ``2 delta`` more, and whose
    ``E @ U`` (the normalisers) by ``3 * 2^-18``."""
    seen = []

    def capture(x):
        seen.append(x[0])
        return head.attn(x)

    rel = 2.0**-8 + (2 * split_score_bound(head, window) + 3 * 2.0**-18 if split else 0.0)
    with torch.inference_mode():
        head.pooled(window[None], attention=capture)
        dim = seen[0].shape[-1]
        v = torch.nn.functional.linear(seen[0], head.attn.qkv.weight[2 * dim:], head.attn.qkv.bias[2 * dim:])
        gain = (head.classifier.weight @ head.attn.proj.weight).abs()
        return rel * gain @ v.abs().amax(0)


@pytest.mark.parametrize("device, kernels", [("cpu", "torch"), pytest.param("cuda", "torch", marks=NEEDS_CUDA),
                                             ("cpu", "native")])
@pytest.mark.parametrize("qk_scale, token_scale", [(1.0, 1.0), (5.0, 1.0), (5.0, 10.0)])
def test_bf16_blocks_stay_within_the_stated_bound(qk_scale, token_scale, device, kernels):
    """``block_dtype="bfloat16"`` rounds each stored weight to 8 significant bits, nothing else:
    the logits stay within :func:`bf16_logit_bound` of the reference forward (float64), the
    blocks take half the memory, and the rounding is real (the logits differ from float32
    blocks').  Token scale 10 makes exact rows, whose logits are recomputed from the contents."""
    heads = {k: h.to(device) for k, h in make_heads(qk_scale=qk_scale).items() if k.startswith("step")}
    amx = native_kernels.amx_available()
    exact32, bf16 = FastStepRunner(heads), FastStepRunner(heads, kernels=kernels, block_dtype="bfloat16")
    assert bf16.block_dtype == "bfloat16" and bf16.kernels == kernels
    torch.manual_seed(3)
    frames = (torch.randn(2 * T, 1 + N_TOK, D) * token_scale).to(device)
    moved = 0.0
    for i in range(len(frames)):
        for runner in (exact32, bf16):
            runner.add_frame(i, frames[i])
        if i < T - 1:
            continue
        ids = np.arange(i - T + 1, i + 1)
        ids = ids[::-1].copy() if i % 2 else ids
        out, out32 = bf16.predict(frames[ids], ids), exact32.predict(frames[ids], ids)
        with torch.inference_mode():
            for task, head in heads.items():
                truth = head.double()(frames[ids][None].double())[0]
                head.float()
                bound = bf16_logit_bound(head, frames[ids].cpu(), split=kernels == "native" and amx).double()
                err = (out[task].double() - truth).abs()
                slack = 1e-4 * truth.abs().max() + ATOL
                assert bool((err <= 1.05 * bound + slack).all()), f"{task}: error {err.tolist()} > bound {bound.tolist()}"
                moved = max(moved, float((out[task] - out32[task]).abs().max()))
    assert moved > 0, "bfloat16 blocks gave float32's logits bit for bit: nothing was rounded"
    assert bf16.fallbacks == 0
    if token_scale > 1:
        assert bf16.exact_rows > 0 and bf16.exact_rows == exact32.exact_rows
    g16, g32 = bf16.groups[0], exact32.groups[0]
    assert g16.E.dtype == torch.bfloat16 and g16.E.nbytes * 2 == g32.E.nbytes
    assert bf16.memory_bytes() == exact32.memory_bytes() - g16.E.nbytes


def test_block_dtype_is_validated():
    heads = make_heads()
    with pytest.raises(ValueError, match="block_dtype must be one of float32, bfloat16, not 'float16'"):
        FastStepRunner(heads, block_dtype="float16")
    with pytest.raises(ValueError, match="kernels='onnxruntime' stores float32 blocks"):
        FastStepRunner(heads, kernels="onnxruntime", block_dtype="bfloat16")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")
def test_block_cache_pages_exist_before_the_first_frame():
    """The caches' pages are touched when they are allocated (the node's warm-up): a huge page
    met at its first touch can wait for memory compaction, and a node that met them during its
    first camera frames fell 5 s behind and dropped 25 frames."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    cache = fast_kernels.host_zeros((128 << 20,), torch.uint8, torch.device("cpu"))
    assert rss() - before >= 120 << 20
    assert int(cache[:: 1 << 20].sum()) == 0


def test_memory_bytes_vit_s():
    """ViT-S/14 at 224, T=16, 3 STEP heads: ~403 MB of stored blocks per head."""
    heads = {f"t{i}": StepHead(384, 10, 16, 256, num_heads=6) for i in range(3)}
    runner = FastStepRunner(heads)
    blocks = 3 * 6 * 16 * 16 * 256 * 256 * 4
    total = runner.memory_bytes(256)
    assert blocks <= total < 1.2 * blocks
    print(f"FastStepRunner cache, ViT-S, 3 heads: {total / 2**20:.0f} MiB (blocks {blocks / 2**20:.0f} MiB)")


def multi_head_manifest():
    data = tiny_manifest_dict(kinds=())
    labels = ["pick_up", "put_down", "wave"]
    data["heads"] = [
        {"task": f"step{i}", "kind": "step", "labels": labels, "options": {"num_heads": 2}} for i in range(3)
    ] + [{"task": "attentive", "kind": "attentive", "labels": labels, "options": {"num_heads": 2}}]
    return data


def test_streaming_engine_fast_runner_equals_reference_runner():
    from step_ros.model.manifest import parse_manifest
    from step_ros.model.multitask import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel.from_manifest(parse_manifest(multi_head_manifest(), ROOT), load_checkpoints=False).eval()
    with torch.no_grad():
        for task in ("step0", "step1", "step2"):
            model.heads[task].attn.qkv.weight[:128] *= 4
    frames = random_frames(30)
    stamps = [i * 0.1 for i in range(20)] + [5.0 + i * 0.1 for i in range(10)]  # a gap: reset
    fast = FastStepRunner(model)
    assert fast.fast_tasks == ["step0", "step1", "step2"]
    tokens = dict(zip((f.tobytes() for f in frames), model.backbone.encode(frames)))  # encode once
    engines = [StreamingEngine(model, runner=runner, min_frames=2, encode=lambda f: tokens[f.tobytes()])
               for runner in (ReferenceRunner(model), fast)]
    n = 0
    for frame, stamp in zip(frames, stamps):
        ref, out = (e.push(frame, stamp) for e in engines)
        assert (ref is None) == (out is None)
        if ref is None:
            continue
        n += 1
        assert ref.window_complete == out.window_complete
        for task, r in ref.tasks.items():
            np.testing.assert_allclose(out.tasks[task].probs, r.probs, rtol=1e-5, atol=1e-6)
            assert out.tasks[task].index == r.index
    assert engines[1].stats.resets == {"gap": 1}
    assert n > 10 and fast.fallbacks == 0 and fast.reference_predictions > 0


def test_fallback_sweep_reports_no_fallback_and_the_error():
    """The bench's sweep (step-ros bench, rows "fallback sweep") on tiny sharp heads."""
    from step_ros.deploy.bench_heads import sweep_fallbacks

    heads = {k: h for k, h in make_heads(qk_scale=5.0).items() if k.startswith("step")}
    rows = sweep_fallbacks(heads, torch.randn(T + 2, 1 + N_TOK, D), scales=(1.0, 10.0), label="tiny")
    assert [r["name"] for r in rows] == ["fallback sweep: tiny, tokens x1", "fallback sweep: tiny, tokens x10"]
    assert [r["fallbacks"] for r in rows] == [0, 0] and all(r["predictions"] == 3 for r in rows)
    assert all(r["max_abs_dlogit"] <= 1e-5 * max(1.0, r["max_abs_logit"]) for r in rows)
    assert all(r["ms_frame"] > 0 for r in rows)


def test_the_command_line_flushes_denormals_before_its_threads_start():
    """``step-ros`` sets FTZ/DAZ before any command's first PyTorch op (see flush_denormals)."""
    code = ("import torch; from step_ros.cli import main; main(['params', '--arch', 'dinov2_vits14']); "
            "torch.set_num_threads(2); print(int((torch.full((1 << 20,), 1e-20) * 1e-20).count_nonzero()))")
    assert run_python(code).split()[-1] == "0"


@pytest.mark.parametrize("kernels", ["torch", "native", "onnxruntime"])
def test_a_dropped_runner_frees_its_caches_at_once(kernels):
    """The block cache is GBs: it must go when the runner goes, not when the cyclic garbage
    collector next runs (the kernels referred back to their group, and a bench that made runner
    after runner was killed for memory)."""
    if kernels == "onnxruntime":
        pytest.importorskip("onnxruntime")
    import gc
    import weakref

    heads = {k: h for k, h in make_heads().items() if k.startswith("step")}
    runner = FastStepRunner(heads, kernels=kernels)
    runner.add_frame(0, torch.randn(1 + N_TOK, D))
    groups = [weakref.ref(g) for g in runner.groups]
    caches = [weakref.ref(g.E) for g in runner.groups]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del runner
        assert all(ref() is None for ref in groups + caches)
    finally:
        if enabled:
            gc.enable()
