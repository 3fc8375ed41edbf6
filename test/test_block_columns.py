"""The bfloat16 block pass (step_ros.model.block_columns): the compiled kernel against PyTorch
ops, the build cache, and the fallback when no C compiler works."""

from __future__ import annotations

import logging

import pytest
import torch

from step_ros.model import block_columns


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
    if block_columns.load_native() is None:
        pytest.skip(f"no compiled kernel here: {block_columns.native_status()}")
    r, E, U = inputs(3, 5, n)
    native = block_columns.columns_bf16(r, E, U, torch.empty(5, n))
    ops = block_columns.columns_bf16(r, E, U, torch.empty(5, n), native=False)
    truth = by_hand(r, E, U)
    torch.testing.assert_close(native.double(), truth, rtol=2e-6, atol=0)
    torch.testing.assert_close(ops.double(), truth, rtol=2e-6, atol=0)


def test_without_a_compiler_pytorch_ops_give_the_same_numbers(monkeypatch, tmp_path, log_records):
    """A robot without a C toolchain still runs bfloat16 blocks: PyTorch ops, a warning saying
    why, the same numbers."""
    r, E, U = inputs(2, 4, 256, seed=1)
    monkeypatch.setattr(block_columns, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(tmp_path / "cache"))
    records = log_records("step_ros.model.block_columns", logging.WARNING)
    assert block_columns.load_native() is None
    assert "no C compiler" in block_columns.native_status() and "no-such-cc" in block_columns.native_status()
    out = block_columns.columns_bf16(r, E, U, torch.empty(4, 256))
    torch.testing.assert_close(out.double(), by_hand(r, E, U), rtol=2e-6, atol=0)
    assert any("without the compiled kernel" in rec.getMessage() for rec in records)
    assert not (tmp_path / "cache").exists()


def test_a_cache_folder_it_cannot_write_falls_back_with_the_reason(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(block_columns, "_loaded", {})
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(blocker))
    assert block_columns.load_native() is None
    assert "not-a-folder" in block_columns.native_status()
    r, E, U = inputs(2, 3, 9)
    out = block_columns.columns_bf16(r, E, U, torch.empty(3, 9))
    torch.testing.assert_close(out.double(), by_hand(r, E, U), rtol=2e-6, atol=0)


def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if block_columns.load_native() is None:
        pytest.skip(f"no compiled kernel here: {block_columns.native_status()}")
    monkeypatch.setattr(block_columns, "_loaded", {})
    monkeypatch.setenv("STEP_ROS_CACHE_DIR", str(tmp_path))
    assert block_columns.load_native() is not None
    built = sorted((tmp_path / "kernels").glob("step_columns_bf16-*.so"))
    assert len(built) == 1, built
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(block_columns, "_loaded", {})  # a new process: loads, does not rebuild
    assert block_columns.load_native() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert block_columns.native_status().startswith("native: compiled with")


def test_bad_shapes_and_dtypes_are_refused():
    r, E, U = inputs(2, 3, 9)
    with pytest.raises(ValueError, match="do not fit"):
        block_columns.columns_bf16(r, E.float(), U, torch.empty(3, 9))
    with pytest.raises(ValueError, match="do not fit"):
        block_columns.columns_bf16(r, E, U, torch.empty(4, 9))
    with pytest.raises(ValueError, match="contiguous"):
        block_columns.columns_bf16(r.transpose(0, 1).contiguous().transpose(0, 1), E, U, torch.empty(3, 9))
