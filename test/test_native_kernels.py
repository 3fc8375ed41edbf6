"""step_ros's compiled kernels (step_ros.model.native_kernels): the bfloat16 block pass and the
fused block creation against their definitions, the build cache, and the fallback when no C
compiler works."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from step_ros.model import native_kernels
from step_ros.model.fast_kernels import EXP_FLOOR
from step_ros.model.fast_step import FastStepRunner
from step_ros.model.heads import StepHead


def inputs(T: int, O: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(T, O, n, generator=g) * torch.exp(torch.randn(T, O, 1, generator=g) * 5)
    r[0, 0, : n // 2] = 0.0  # rows the engine keeps out of the pass (exact rows)
    E = torch.rand(T, O, n, n, generator=g).bfloat16()
    U = torch.rand(T, O, n, generator=g)
    return r, E, U


def by_hand(r, E, U):
    """float64, block by block: the definition."""
    w = torch.einsum("goj,gojl->gol", r.double(), E.double())
    return (U.double() * w).sum(0)


@pytest.mark.parametrize("n", [9, 256, 300])  # plain C; the AVX-512 path where the CPU has it; both
def test_compiled_kernel_equals_the_definition_and_the_pytorch_ops(n):
    if native_kernels.load_native() is None:
        pytest.skip(f"no compiled kernel here: {native_kernels.native_status()}")
    r, E, U = inputs(3, 5, n)
    native = native_kernels.columns_bf16(r, E, U, torch.empty(5, n))
    ops = native_kernels.columns_bf16(r, E, U, torch.empty(5, n), native=False)
    truth = by_hand(r, E, U)
    torch.testing.assert_close(native.double(), truth, rtol=2e-6, atol=0)
    torch.testing.assert_close(ops.double(), truth, rtol=2e-6, atol=0)


def test_without_a_compiler_pytorch_ops_give_the_same_numbers(monkeypatch, tmp_path, log_records):
    """A robot without a C toolchain still runs bfloat16 blocks: PyTorch ops, a warning saying
    why, the same numbers."""
    r, E, U = inputs(2, 4, 256, seed=1)
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(tmp_path / "cache"))
    records = log_records("step_ros.model.native_kernels", logging.WARNING)
    assert native_kernels.load_native() is None
    assert "no C compiler" in native_kernels.native_status() and "no-such-cc" in native_kernels.native_status()
    out = native_kernels.columns_bf16(r, E, U, torch.empty(4, 256))
    torch.testing.assert_close(out.double(), by_hand(r, E, U), rtol=2e-6, atol=0)
    assert any("without the compiled kernel" in rec.getMessage() for rec in records)
    assert not (tmp_path / "cache").exists()


def test_a_cache_folder_it_cannot_write_falls_back_with_the_reason(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(blocker))
    assert native_kernels.load_native() is None
    assert "not-a-folder" in native_kernels.native_status()
    r, E, U = inputs(2, 3, 9)
    out = native_kernels.columns_bf16(r, E, U, torch.empty(3, 9))
    torch.testing.assert_close(out.double(), by_hand(r, E, U), rtol=2e-6, atol=0)


def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if native_kernels.load_native() is None:
        pytest.skip(f"no compiled kernel here: {native_kernels.native_status()}")
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(tmp_path))
    assert native_kernels.load_native() is not None
    built = sorted((tmp_path / "kernels").glob("step_native-*.so"))
    assert len(built) == 1, built
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native_kernels, "_loaded", {})  # a new process: loads, does not rebuild
    assert native_kernels.load_native() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert native_kernels.native_status().startswith("native: compiled with")


def test_bad_shapes_and_dtypes_are_refused():
    r, E, U = inputs(2, 3, 9)
    with pytest.raises(ValueError, match="do not fit"):
        native_kernels.columns_bf16(r, E.float(), U, torch.empty(3, 9))
    with pytest.raises(ValueError, match="do not fit"):
        native_kernels.columns_bf16(r, E, U, torch.empty(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        native_kernels.columns_bf16(r.transpose(0, 1).contiguous().transpose(0, 1), E, U, torch.empty(3, 9))


# -- the fused block creation -------------------------------------------------------------------

def create_inputs(T: int, O: int, n: int, d: int, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(T, O, n, d, generator=g) * scale
    bT = torch.randn(T, O, d, n, generator=g) * scale
    Ut = torch.rand(T, O, n, T, generator=g)
    return a, bT, Ut


def create_by_hand(a, bT, Ut, q: int, k: int):
    """float64: block (q, k) of every o -- S, its row max, E = exp(max(S - m, floor)), and
    M = log(E @ U) as (P, o, j)."""
    S = a[q].double() @ bT[k].double()
    m = S.amax(-1)
    E = (S - m[..., None]).clamp(min=EXP_FLOOR).exp()
    return S, m, E, (E @ Ut[k].double()).log().permute(2, 0, 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("T, n, d, scale", [(5, 9, 16, 1.0), (16, 40, 32, 1.0), (16, 256, 64, 0.4), (4, 64, 64, 3.0),
                                            (4, 37, 40, 1.0), (20, 24, 16, 1.0)])  # T = 20: the plain C path
def test_fused_creation_equals_the_definition(T, n, d, scale, dtype, amx, threads):
    """Every new block of one frame slot, against float64: ``m`` and ``M = log(E @ U)`` (and
    its minimum over positions) to float32 rounding, ``E`` to float32 rounding or, in bfloat16,
    to its rounding (2^-8); nothing else in the cache is written.  Scale 3 drives most of
    ``S - m`` under the floor (-87).  With AMX (bfloat16 blocks), ``S`` and ``E @ U`` come from
    three bfloat16 products each: ``S`` within ``3 * 2^-18 sum_i |a_i b_i|`` more, ``E @ U``
    within ``3 * 2^-18`` relative more (n = 37, d = 40: padded tiles)."""
    if native_kernels.load_native() is None:
        pytest.skip(f"no compiled kernels here: {native_kernels.native_status()}")
    if amx and not native_kernels.amx_available():
        pytest.skip(f"no AMX here: {native_kernels.native_status()}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        O, x = 3, T // 2
        a, bT, Ut = create_inputs(T, O, n, d, scale)
        sentinel = -7.0
        E = torch.full((T, T, O, n, n), sentinel, dtype=dtype)
        M = torch.full((T, T, T, O, n), sentinel)
        mr, mc, minr, minc = (torch.full((T, O, n), sentinel) for _ in range(4))
        native_kernels.create_blocks(a, bT, Ut, E, M, mr, mc, minr, minc, x, EXP_FLOOR, amx=amx)
        if amx and T <= native_kernels.FUSED_MAX_FRAMES:  # the tile unit ran: not the AVX-512 path's numbers
            plain = [torch.zeros(T, O, n) for _ in range(4)]
            native_kernels.create_blocks(a, bT, Ut, E.clone(), M.clone(), *plain, x, EXP_FLOOR)
            assert not torch.equal(plain[0], mr)
    finally:
        torch.set_num_threads(threads_before)
    for s in range(T):
        for (q, k), m_out, low in (((x, s), mr[s], minr[s]), ((s, x), mc[s], minc[s])):
            if (q, k) == (s, x) and s == x:
                assert bool((mc[x] == sentinel).all()) and bool((minc[x] == sentinel).all())
                continue
            S, m, E64, M64 = create_by_hand(a, bT, Ut, q, k)
            slack = 1e-6 * max(1.0, float(S.abs().max()))  # float32 sums of d products
            split = 0.0
            if amx:  # the three-piece products' bound on S, per row
                split = 3 * 2.0**-18 * float((a[q].double().abs() @ bT[k].double().abs()).max())
                slack += split
            torch.testing.assert_close(m_out.double(), m, rtol=0, atol=slack)
            got = E[q, k].double()
            rel = 2.0 ** -8 if dtype == torch.bfloat16 else 4e-7
            assert bool(((got - E64).abs() <= rel * E64 + 4 * slack * E64 + 1e-30).all()), f"block ({q}, {k})"
            m_tol = 2e-6 + 4 * slack + (3 * 2.0**-18 if amx else 0.0)  # E @ U's split: relative, in the log
            torch.testing.assert_close(M[q, k].double(), M64, rtol=0, atol=m_tol)
            torch.testing.assert_close(low.double(), M64.amin(0), rtol=0, atol=m_tol)

    written = torch.zeros(T, T, dtype=torch.bool)
    written[x, :] = written[:, x] = True
    assert bool((E[~written] == sentinel).all()) and bool((M[~written] == sentinel).all()), "other slots written"
    if scale >= 3:
        floored = E[x].float()
        assert float(floored.min()) == pytest.approx(np.exp(EXP_FLOOR), rel=2 ** -7)  # the floor, not 0 or denormal


def test_fused_creation_refuses_what_does_not_fit():
    a, bT, Ut = create_inputs(4, 2, 9, 8, 1.0)
    E, M = torch.zeros(4, 4, 2, 9, 9), torch.zeros(4, 4, 4, 2, 9)
    m = [torch.zeros(4, 2, 9) for _ in range(4)]
    with pytest.raises(ValueError, match=r"create_blocks: E is \(4, 4, 2, 9, 8\)"):
        native_kernels.create_blocks(a, bT, Ut, E[..., :8].contiguous(), M, *m, 0, EXP_FLOOR)
    with pytest.raises(ValueError, match="bT .* not contiguous"):
        native_kernels.create_blocks(a, bT.transpose(0, 1).contiguous().transpose(0, 1), Ut, E, M, *m, 0, EXP_FLOOR)
    with pytest.raises(ValueError, match="slot 4 outside 0..3"):
        native_kernels.create_blocks(a, bT, Ut, E, M, *m, 4, EXP_FLOOR)


def test_native_kernels_without_a_compiler_create_blocks_with_pytorch(monkeypatch, tmp_path, log_records):
    """``head_kernels: native`` on a robot without a C toolchain: PyTorch's block creation, a
    log line saying why, the same predictions."""
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    records = log_records("step_ros.model.fast_kernels", logging.INFO)
    torch.manual_seed(0)
    heads = {"a": StepHead(32, 3, 4, 9, num_heads=2).eval()}
    frames = torch.randn(6, 10, 32)
    runner = FastStepRunner(heads, kernels="native")
    for i in range(6):
        runner.add_frame(i, frames[i])
    ids = np.arange(2, 6)
    out = runner.predict(frames[ids], ids)["a"]
    with torch.inference_mode():
        torch.testing.assert_close(out, heads["a"](frames[ids][None])[0], rtol=1e-4, atol=1e-5)
    assert runner.kernels == "native"
    assert any("create blocks with PyTorch ops" in r.getMessage() and "no C compiler" in r.getMessage()
               for r in records)


# -- the prediction's row weights ---------------------------------------------------------------

@pytest.mark.parametrize("qk_scale", [1.0, 40.0])
def test_compiled_row_weights_equal_pytorchs(qk_scale):
    """``step_row_weights`` against the engine's PyTorch bookkeeping on the same caches, at a
    shuffled window order: every row weight ``r'`` (0 for exact rows), ``U`` at the query slots'
    positions, the exact rows' ``log r'`` (qk_scale 40 makes them) and the CLS key's weight."""
    from test_fast_step import D, N_TOK, T, make_heads

    if not native_kernels.row_weights_available():
        pytest.skip(f"no compiled AVX-512 kernels here: {native_kernels.native_status()}")
    heads = {k: h for k, h in make_heads(qk_scale=qk_scale).items() if k.startswith("step")}
    runner = FastStepRunner(heads, kernels="native")
    frames = torch.randn(2 * T, 1 + N_TOK, D, generator=torch.Generator().manual_seed(1))
    for i in range(T + 2):
        runner.add_frame(i, frames[i])
    g = runner.groups[0]
    assert g.kernels.fused_weights
    pos = torch.randperm(T, generator=torch.Generator().manual_seed(2))
    exact = g.exact.nonzero(as_tuple=True) if g.exact_count else None
    assert (exact is not None) == (qk_scale > 1)
    with torch.inference_mode():
        log_native, wg_native = g._row_weights_native(pos, exact)
        r_native, u_native = g.r_buf.clone(), g.U_buf.clone()
        g.r_buf.fill_(-1.0)
        g.U_buf.fill_(-1.0)
        log_torch, wg_torch = g._row_weights_torch(pos, exact)
    torch.testing.assert_close(r_native, g.r_buf, rtol=1e-5, atol=1e-37)
    assert torch.equal(u_native, g.U_buf)
    torch.testing.assert_close(wg_native, wg_torch, rtol=1e-5, atol=1e-30)
    if exact is not None:
        assert bool((r_native[exact] == 0).all())
        torch.testing.assert_close(log_native, log_torch, rtol=1e-5, atol=1e-4)


def test_row_weights_refuse_what_does_not_fit():
    T, O, n = 3, 2, 5
    t = lambda *shape: torch.zeros(*shape)  # noqa: E731
    args = dict(beta=t(T, T, O, n), kappa=t(O, T, T), m=t(T, T, O, n), mu=t(T, T, O), M=t(T, T, T, O, n),
                delta=t(T, O, n), clspos=t(T, O), U=t(T, T, O, n), exact=None, pos=torch.arange(T),
                r=t(T, T, O, n), logr=None, Ubuf=t(T, T, O, n), wg=t(T, O), floor=EXP_FLOOR)
    with pytest.raises(ValueError, match=r"row_weights: mu is \(3, 3\)"):
        native_kernels.row_weights(**{**args, "mu": t(T, T)})
    with pytest.raises(ValueError, match="row_weights: pos is torch.int32"):
        native_kernels.row_weights(**{**args, "pos": torch.arange(T, dtype=torch.int32)})
    with pytest.raises(ValueError, match="row_weights: exact is"):
        native_kernels.row_weights(**{**args, "exact": torch.zeros(T, T, O, n)})
