"""The heavy kernels of the exact streaming STEP engine (:mod:`.fast_step`), in PyTorch, in
ONNX Runtime, or compiled by step_ros (``native``).

* ``project(patches, x)``, per new frame in slot ``x``: the content part of every head's query
  and key projection, written into the group's ``a[x]`` (scaled, with ``c_bar``) and ``bT[x]``.
* ``create(x)``, per new frame in slot ``x``: for every STEP head and attention head, the
  ``2T - 1`` new content blocks ``S = a b^T`` (row blocks ``(x, F)``, column blocks ``(G, x)``),
  their row maxima ``m``, ``E = exp(S - m)`` written in place into the block cache,
  ``M = log(E @ U)`` for every window position (also in place) and its minimum over them.
* ``columns()``, per prediction: the one pass over every stored block, ``w = r' E``, and the
  key columns' weights ``sum_G U * w``.

All read and write the :class:`~step_ros.model.fast_step._StepGroup`'s own buffers, so the
implementations are interchangeable and give the same numbers to float32 rounding.
PyTorch runs anywhere (CPU and CUDA).  ONNX Runtime (CPU only) runs the same arithmetic
through MLAS, whose fp32 GEMM is about twice as fast as PyTorch's MKL on the AMD VMs: its graphs
have fixed shapes, read the group's tensors in place and write straight into the block cache
(I/O binding, no copies).  On an Intel Xeon, where MKL takes its AVX-512 code, PyTorch's were
the faster, and ``native`` faster still; ``auto`` times those that can run on the machine
(:func:`make_kernels`), and ``step-ros bench`` shows each.

``native`` (CPU) is PyTorch's set with ``create`` replaced by the fused, compiled block creation
of :mod:`.native_kernels` (AVX-512, and the AMX tile unit for bfloat16 blocks where the CPU has
one; where the CPU has no AVX-512, PyTorch's ``create`` again): one pass per block in the CPU's
caches instead of seven PyTorch calls (decisions 38, 39); the prediction's row weights are
compiled too (``fused_weights``).

With bfloat16 blocks (``block_dtype``) PyTorch's ``create`` makes each block in float32
scratch and stores it rounded (the native one rounds in registers), and the pass over the
blocks is the compiled kernel of :mod:`.native_kernels` in both; ONNX Runtime's set keeps
float32 blocks.

Each works a frame slot at a time (ONNX Runtime: the ``n x n`` blocks of all heads at once;
PyTorch: one STEP head's at a time; native: six query rows of one block per thread), so their
scratch memory is a few blocks, not a copy of the cache.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .native_kernels import (FUSED_MAX_FRAMES, columns_bf16, create_blocks, fused_create_available, load_native,
                             native_status, row_weights_available)
from .device import keep_denormal_mode

if TYPE_CHECKING:
    from .fast_step import _StepGroup

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "onnxruntime", "native")

#: How the block cache stores ``E``: ``float32`` (exact to float32 rounding) or ``bfloat16``
#: (half the memory and half the per-prediction pass; each attention weight within a relative
#: 2^-8 of the exact one, see :mod:`.fast_step`; PyTorch and native kernels, not ONNX Runtime's).
BLOCK_DTYPES = ("float32", "bfloat16")


#: Below this many (pooled) tokens per frame ``auto`` takes PyTorch without measuring: ONNX
#: Runtime's per-call overhead dominates there (three 6-head ViT-S-width heads, T = 16, 2 threads,
#: AMD EPYC: PyTorch 12.8 vs ONNX Runtime 14.5 ms per frame at 64 tokens; the demo model's 16
#: tokens 1.5 vs 2.0 ms).
AUTO_MIN_TOKENS = 128

#: Timed rounds (after an untimed one) per candidate when ``auto`` measures the kernels.
AUTO_ROUNDS = 3

#: The floor put under every argument of ``exp`` in the engine: ``exp(-87) = 1.6e-38`` is still a
#: normal float32.  Below about -87.3 PyTorch's vectorised ``exp`` leaves its fast path, ~100x
#: slower (12.6 against 0.12 ms per 393k values, one thread, Intel Xeon), with or without
#: flush-to-zero, and ONNX Runtime's ``Exp`` 3-10x; sharp attention (large tokens, trained heads)
#: puts over half of a block's entries there (three ViT-S heads at token scale 10: 964 instead of
#: 101 ms per frame, with flush_denormals as well; docs/DECISIONS.md 36).  A weight raised from below ``1.6e-38`` to it changes nothing the engine's
#: bound does not already allow: an entry under ``1e-38`` weighs under ``1e-38 e^60`` of its row
#: (:mod:`.fast_step`, "Numerical safety").
EXP_FLOOR = -87.0


def floored_exp_(x: torch.Tensor) -> torch.Tensor:
    """``exp`` in place, its argument floored at :data:`EXP_FLOOR` (the fast path, normal results)."""
    return x.clamp_(min=EXP_FLOOR).exp_()


def resolve_kernels(kernels: str, device: torch.device, tokens: int | None = None,
                    block_dtype: str = "float32") -> str:
    """Validate ``kernels``; for ``auto``, the outcome where it needs no measuring: PyTorch off
    the CPU or under :data:`AUTO_MIN_TOKENS` tokens.  Otherwise it stays ``auto`` (``tokens``
    None: not known yet), for :func:`make_kernels` to measure the candidates."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if block_dtype not in BLOCK_DTYPES:
        raise ValueError(f"block_dtype must be one of {', '.join(BLOCK_DTYPES)}, not {block_dtype!r}")
    if kernels in ("onnxruntime", "native") and device.type != "cpu":
        raise ValueError(f"kernels={kernels!r} runs on the CPU; the heads are on {device}")
    if kernels == "onnxruntime" and block_dtype != "float32":
        raise ValueError(f"kernels='onnxruntime' stores float32 blocks; block_dtype={block_dtype!r} needs "
                         f"kernels torch, native or auto")
    if kernels == "auto" and (device.type != "cpu" or (tokens is not None and tokens < AUTO_MIN_TOKENS)):
        return "torch"
    return kernels


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, every page allocated; on a Linux CPU in transparent huge pages where the kernel
    allows it (``madvise`` mode): the block cache is read end to end every prediction, and
    2 MiB pages spare the TLB (measured: the pass over the blocks ~7 % faster)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < (64 << 20):
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no THP on this kernel: ordinary pages
        pass
    # Touched now, so that every page exists before the first camera frame: a huge page's first
    # touch may wait for the kernel to compact memory, and a node that met its bfloat16 blocks'
    # pages during its first frames fell 5 s behind and dropped 25 frames (the float32 path's
    # start-up timing happened to touch them first).
    return torch.frombuffer(buf, dtype=dtype).view(shape).zero_()  # the tensor keeps buf alive


def cpu_session_options(threads: int | None = None) -> Any:
    """ONNX Runtime options for graphs that share the CPU with PyTorch: as many intra-op threads
    as PyTorch's, one graph node at a time, workers that sleep when idle (spinning ones took
    the CPU time of PyTorch's OpenMP threads: 160 instead of 91 ms for three heads, session 7),
    and the process's denormal mode (:func:`~step_ros.model.device.keep_denormal_mode`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return keep_denormal_mode(opts)


class TorchKernels:
    """The kernels as PyTorch calls (any device)."""

    name = "torch"
    fused = False  #: whether ``create`` is compiled (:class:`NativeKernels`) rather than PyTorch's
    fused_weights = False  #: whether the prediction's row weights are compiled (:class:`NativeKernels`)

    def __init__(self, group: _StepGroup) -> None:
        self.g = weakref.proxy(group)  # the group owns its kernels: no cycle, so its GB go when it goes
        T, KH, n = group.T, group.K * group.H, group.n
        self.bf16 = group.E.dtype == torch.bfloat16
        self.eu_row = self.eu_col = self.block = None
        if not self.fused:  # PyTorch's create: its scratch
            self.eu_row = torch.empty(T, KH, n, T, device=group.device)  # E @ U of the new row blocks
            self.eu_col = torch.empty(T, KH, n, T, device=group.device)  # and of the new column blocks
            # float32 blocks are made in place in the cache; bfloat16 ones in float32 scratch (one
            # STEP head's, 1.5 MB for ViT-S: it stays in the CPU's cache), rounded as they are stored
            self.block = torch.empty(group.H, n, n, device=group.device) if self.bf16 else None
        self.w = None if self.bf16 else torch.empty(T * T * KH, 1, n, device=group.device)  # r' E, per block
        if self.bf16 and group.device.type == "cpu":
            load_native()  # compiled now (the node's warm-up), not at the first complete window

    def project(self, patches: torch.Tensor, x: int) -> None:
        g = self.g
        KH, n, d, D = g.K * g.H, g.n, g.d, g.D
        # a = e Wq^T / sqrt(d) + c_bar, and b^T = Wk e^T: batched per attention head, written in place
        torch.baddbmm(g.cq_bar.view(KH, 1, d), patches.expand(KH, n, D), g.Wq_t, out=g.a[x].view(KH, n, d))
        torch.matmul(g.Wk, patches.t(), out=g.bT[x].view(KH, d, n))

    def create(self, x: int) -> None:
        """One STEP head's blocks of one slot pair at a time: a chunk (H blocks, 1.5 MB for
        ViT-S) stays in the CPU's cache from its GEMM through the row max, the exp and ``E @ U``,
        instead of a frame's 75 MB of new blocks going out to memory and back for each step
        (measured: 40 against 48 ms for three ViT-S heads, Intel Xeon, 2 threads)."""
        g = self.g
        T, K, H, n, d = g.T, g.K, g.H, g.n, g.d
        a, bT, E, Ut = g.a.view(T, K, H, n, d), g.bT.view(T, K, H, d, n), g.E.view(T, T, K, H, n, n), g.Ut
        eu_row, eu_col = self.eu_row.view(T, K, H, n, T), self.eu_col.view(T, K, H, n, T)
        for s in range(T):
            for k in range(K):
                for block, q, key, u, m, eu in (
                        (E[x, s, k], a[x, k], bT[s, k], Ut[s, k], g.mr[s, k], eu_row[s, k]),  # row block (x, s)
                        (E[s, x, k], a[s, k], bT[x, k], Ut[x, k], g.mc[s, k], eu_col[s, k]))[:2 - (s == x)]:
                    work = block if self.block is None else self.block
                    torch.matmul(q, key, out=work)  # (column block (s, x) with s = x: the row block again)
                    torch.amax(work, -1, out=m)
                    floored_exp_(work.sub_(m[..., None]))
                    torch.matmul(work, u, out=eu)  # M from the unrounded E: each weight's rounding stays its own
                    if work is not block:
                        block.copy_(work)  # to bfloat16, rounded to nearest
        self.finish(x)

    def finish(self, x: int) -> None:
        """``M = log(E @ U)`` of the new blocks into place, and its minimum over positions."""
        g = self.g
        T, K, H, n = g.T, g.K, g.H, g.n
        M = g.M.view(T, T, T, K * H, n)
        g.mc[x], self.eu_col[x] = g.mr[x], self.eu_row[x]  # block (x, x)'s statistics, made once
        for eu, low, target in ((self.eu_row, g.minr, M[x]), (self.eu_col, g.minc, M[:, x])):
            eu.log_()
            target.copy_(eu.permute(0, 3, 1, 2))
            torch.amin(target, 1, out=low.view(T, K * H, n))  # over P as a middle axis: ~5x faster than as the last

    def columns(self) -> torch.Tensor:
        g = self.g
        n = g.n
        if self.bf16:
            T = g.T
            columns_bf16(g.r_buf.view(T, -1, n), g.E.view(T, -1, n, n), g.U_buf.view(T, -1, n), g.col_buf.view(-1, n))
            return g.col_buf
        torch.bmm(g.r_buf.view(-1, 1, n), g.E.view(-1, n, n), out=self.w)
        w = self.w.view(g.U_buf.shape)
        return torch.sum(torch.mul(w, g.U_buf, out=w), 0, out=g.col_buf)


class NativeKernels(TorchKernels):
    """PyTorch's kernels with the block creation fused and compiled (:mod:`.native_kernels`,
    AVX-512, CPU): per block one pass in the CPU's caches, not seven PyTorch calls."""

    name = "native"

    def __init__(self, group: _StepGroup) -> None:
        self.fused = fused_create_available(group.T)  # before PyTorch's scratch, which it then skips
        self.fused_weights = row_weights_available()  # the prediction's row weights in one compiled pass
        super().__init__(group)
        if not self.fused:
            log.info("fast STEP engine: native kernels create blocks with PyTorch ops here (%s%s)", native_status(),
                     "" if group.T <= FUSED_MAX_FRAMES else
                     f"; the fused creation takes windows of up to {FUSED_MAX_FRAMES} frames, not {group.T}")

    def create(self, x: int) -> None:
        if not self.fused:
            return super().create(x)
        g = self.g
        T, KH, n, d = g.T, g.K * g.H, g.n, g.d
        create_blocks(g.a.view(T, KH, n, d), g.bT.view(T, KH, d, n), g.Ut.view(T, KH, n, T), g.E.view(T, T, KH, n, n),
                      g.M.view(T, T, T, KH, n), g.mr.view(T, KH, n), g.mc.view(T, KH, n), g.minr.view(T, KH, n),
                      g.minc.view(T, KH, n), x, EXP_FLOOR, amx=self.bf16)
        g.mc[x], g.minc[x] = g.mr[x], g.minr[x]  # block (x, x)'s statistics, made once


class OnnxRuntimeKernels:
    """The kernels as two fixed-shape ONNX graphs run by ONNX Runtime on the group's own CPU
    tensors (I/O binding: inputs read in place, outputs written into the block cache)."""

    name = "onnxruntime"
    fused_weights = False  #: the prediction's row weights: PyTorch's (see :class:`TorchKernels`)

    def __init__(self, group: _StepGroup, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.g = weakref.proxy(group)  # the group owns its kernels: no cycle, so its GB go when it goes
        self.ort = ort
        opts = cpu_session_options(threads)
        self.create_session = ort.InferenceSession(self._create_graph().SerializeToString(), opts,
                                                   providers=["CPUExecutionProvider"])
        self.project_session = ort.InferenceSession(self._project_graph().SerializeToString(), opts,
                                                    providers=["CPUExecutionProvider"])
        self.gemv_session = ort.InferenceSession(self._gemv_graph().SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"])
        self._create_bindings = [self._bind_create(x) for x in range(group.T)]
        self._gemv_binding = self._bind_gemv()

    # -- graphs -------------------------------------------------------------------------------
    def _create_graph(self) -> Any:
        """Per slot s: row block (x, s) from ``a_x`` and ``bT_s``, column block (s, x) from
        ``a_s`` and ``bT_x``; each MatMul -> ReduceMax -> Sub -> Max(floor) -> Exp -> MatMul(U) -> Log ->
        ReduceMin, and the log transposed to (P, KH, n) for ``M``.  One small graph per slot keeps
        ONNX Runtime's intermediates at a few blocks."""
        from onnx import TensorProto, helper

        g = self.g
        T, KH, n, d = g.T, g.K * g.H, g.n, g.d
        nodes, outputs = [], []
        inputs = [("a_x", [KH, n, d]), ("bT_x", [KH, d, n]), ("Ut_x", [KH, n, T])]
        for s in range(T):
            inputs += [(f"a_{s}", [KH, n, d]), (f"bT_{s}", [KH, d, n]), (f"Ut_{s}", [KH, n, T])]
            for kind, (q, k, u) in {"row": ("a_x", f"bT_{s}", f"Ut_{s}"), "col": (f"a_{s}", "bT_x", "Ut_x")}.items():
                p = f"{kind}_{s}"
                nodes += [
                    helper.make_node("MatMul", [q, k], [f"{p}_S"]),
                    helper.make_node("ReduceMax", [f"{p}_S"], [f"{p}_m"], axes=[-1], keepdims=1),
                    helper.make_node("Sub", [f"{p}_S", f"{p}_m"], [f"{p}_D0"]),
                    helper.make_node("Max", [f"{p}_D0", "exp_floor"], [f"{p}_D"]),
                    helper.make_node("Exp", [f"{p}_D"], [f"{p}_E"]),
                    helper.make_node("MatMul", [f"{p}_E", u], [f"{p}_EU0"]),
                    helper.make_node("Log", [f"{p}_EU0"], [f"{p}_EU"]),
                    helper.make_node("ReduceMin", [f"{p}_EU"], [f"{p}_min"], axes=[-1], keepdims=1),
                    helper.make_node("Transpose", [f"{p}_EU"], [f"{p}_M"], perm=[2, 0, 1]),
                ]
                outputs += [f"{p}_E", f"{p}_m", f"{p}_M", f"{p}_min"]
        graph = helper.make_graph(
            nodes, "step_blocks",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
            initializer=[helper.make_tensor("exp_floor", TensorProto.FLOAT, [], [EXP_FLOOR])])
        return self._model(graph)

    def _project_graph(self) -> Any:
        from onnx import TensorProto, helper

        g = self.g
        KH, n, d, D = g.K * g.H, g.n, g.d, g.D
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["patches", "Wq_t"], ["q"]),
             helper.make_node("Add", ["q", "c_bar"], ["a"]),
             helper.make_node("Transpose", ["patches"], ["patches_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["Wk", "patches_t"], ["bT"])], "step_project",
            [helper.make_tensor_value_info("patches", TensorProto.FLOAT, [n, D]),
             helper.make_tensor_value_info("Wq_t", TensorProto.FLOAT, [KH, D, d]),
             helper.make_tensor_value_info("Wk", TensorProto.FLOAT, [KH, d, D]),
             helper.make_tensor_value_info("c_bar", TensorProto.FLOAT, [KH, 1, d])],
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [KH, n, d]),
             helper.make_tensor_value_info("bT", TensorProto.FLOAT, [KH, d, n])])
        return self._model(graph)

    def _gemv_graph(self) -> Any:
        from onnx import TensorProto, helper

        g = self.g
        T, blocks, n = g.T, g.T * g.T * g.K * g.H, g.n
        row = blocks // T * n  # one query slot's share of w, flattened
        nodes = [
            helper.make_node("MatMul", ["r", "E"], ["w"]),
            helper.make_node("Reshape", ["w", "w_shape"], ["w_g"]),
            helper.make_node("Mul", ["w_g", "U"], ["wu"]),
            helper.make_node("ReduceSum", ["wu", "axis0"], ["col"], keepdims=0),
        ]
        consts = [helper.make_tensor("w_shape", TensorProto.INT64, [2], [T, row]),
                  helper.make_tensor("axis0", TensorProto.INT64, [1], [0])]
        graph = helper.make_graph(
            nodes, "step_columns",
            [helper.make_tensor_value_info("r", TensorProto.FLOAT, [blocks, 1, n]),
             helper.make_tensor_value_info("E", TensorProto.FLOAT, [blocks, n, n]),
             helper.make_tensor_value_info("U", TensorProto.FLOAT, [T, row])],
            [helper.make_tensor_value_info("col", TensorProto.FLOAT, [row])], initializer=consts)
        return self._model(graph)

    @staticmethod
    def _model(graph: Any) -> Any:
        from onnx import helper

        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    # -- bindings (fixed buffers: made once per slot) ---------------------------------------
    @staticmethod
    def _bind(binding: Any, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        if not tensor.is_contiguous():
            raise RuntimeError(f"fast STEP kernels: {name} is not contiguous")
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cpu", 0, np.float32, list(tensor.shape), tensor.data_ptr())

    def _bind_create(self, x: int) -> Any:
        g = self.g
        T, KH, n, d = g.T, g.K * g.H, g.n, g.d
        a, bT, E, Ut = g.a.view(T, KH, n, d), g.bT.view(T, KH, d, n), g.E.view(T, T, KH, n, n), g.Ut.view(T, KH, n, T)
        M = g.M.view(T, T, T, KH, n)
        mr, minr = g.mr.view(T, KH, n, 1), g.minr.view(T, KH, n, 1)
        mc, minc = g.mc.view(T, KH, n, 1), g.minc.view(T, KH, n, 1)
        b = self.create_session.io_binding()
        self._bind(b, "a_x", a[x])
        self._bind(b, "bT_x", bT[x])
        self._bind(b, "Ut_x", Ut[x])
        for s in range(T):
            self._bind(b, f"a_{s}", a[s])
            self._bind(b, f"bT_{s}", bT[s])
            self._bind(b, f"Ut_{s}", Ut[s])
            for name, t in ((f"row_{s}_E", E[x, s]), (f"row_{s}_m", mr[s]), (f"row_{s}_M", M[x, s]),
                            (f"row_{s}_min", minr[s]), (f"col_{s}_E", E[s, x]), (f"col_{s}_m", mc[s]),
                            (f"col_{s}_M", M[s, x]), (f"col_{s}_min", minc[s])):
                self._bind(b, name, t, output=True)
        return b

    def _bind_gemv(self) -> Any:
        g = self.g
        n = g.n
        b = self.gemv_session.io_binding()
        self._bind(b, "r", g.r_buf.view(-1, 1, n))
        self._bind(b, "E", g.E.view(-1, n, n))
        self._bind(b, "U", g.U_buf.view(g.T, -1))
        self._bind(b, "col", g.col_buf.view(-1), output=True)
        return b

    # -- kernels ------------------------------------------------------------------------------
    def project(self, patches: torch.Tensor, x: int) -> None:
        g = self.g
        KH, n, d = g.K * g.H, g.n, g.d
        b = self.project_session.io_binding()
        self._bind(b, "patches", patches)
        self._bind(b, "Wq_t", g.Wq_t)  # rebound every call: refresh() may have replaced them
        self._bind(b, "Wk", g.Wk)
        self._bind(b, "c_bar", g.cq_bar.view(KH, 1, d))
        self._bind(b, "a", g.a[x].view(KH, n, d), output=True)
        self._bind(b, "bT", g.bT[x].view(KH, d, n), output=True)
        self.project_session.run_with_iobinding(b)

    def create(self, x: int) -> None:
        self.create_session.run_with_iobinding(self._create_bindings[x])

    def columns(self) -> torch.Tensor:
        self.gemv_session.run_with_iobinding(self._gemv_binding)
        return self.g.col_buf


def make_kernels(kernels: str, group: _StepGroup) -> tuple[TorchKernels | OnnxRuntimeKernels, dict[str, float]]:
    """The kernels for ``group`` (its buffers allocated), and ``{name: ms}`` when ``auto`` timed them.

    ``auto`` (after :func:`resolve_kernels`) times the candidates that can run here -- PyTorch;
    ``native`` where its fused creation compiles with AVX-512; ONNX Runtime where it is installed
    and the blocks are float32 -- one ``create`` and one ``columns`` per round, and keeps the
    fastest.  Which one wins depends on the CPU: on the AMD EPYC VMs ONNX Runtime's MLAS was 1.3x
    faster than PyTorch's MKL (which takes its AVX2 kernels there), on an Intel Xeon PyTorch was
    1.1x faster (DECISIONS 35) and ``native`` faster than both (DECISIONS 38).  It costs about ten
    frames' head work once, when the first frame sets the token count; each writes only slot 0's
    blocks, which that frame then makes again.  The block cache's pages are real by then
    (:func:`host_zeros` touches them), so the timed pass reads memory, not one shared page of zeros.
    """
    if kernels == "torch":
        return TorchKernels(group), {}
    if kernels == "native":
        return NativeKernels(group), {}
    if kernels == "onnxruntime":
        return OnnxRuntimeKernels(group), {}
    candidates: list[TorchKernels | OnnxRuntimeKernels] = [TorchKernels(group)]
    if fused_create_available(group.T):
        candidates.append(NativeKernels(group))
    if group.E.dtype == torch.float32:
        try:
            import onnxruntime  # noqa: F401

            candidates.append(OnnxRuntimeKernels(group))
        except ImportError:
            pass
    if len(candidates) == 1:
        return candidates[0], {}
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for _ in range(1 + AUTO_ROUNDS):  # taking turns, so that a drift of the machine hits all
        for candidate in candidates:
            start = time.perf_counter()
            candidate.create(0)
            candidate.columns()
            times[candidate.name].append(time.perf_counter() - start)
    timings = {name: 1e3 * min(t[1:]) for name, t in times.items()}  # the first round is untimed
    return min(candidates, key=lambda c: timings[c.name]), timings


__all__ = ["AUTO_MIN_TOKENS", "AUTO_ROUNDS", "BLOCK_DTYPES", "EXP_FLOOR", "KERNELS", "NativeKernels",
           "OnnxRuntimeKernels", "TorchKernels", "cpu_session_options", "floored_exp_", "host_zeros", "make_kernels",
           "resolve_kernels"]
