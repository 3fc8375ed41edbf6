"""``StepHead.forward_indexed`` as an ONNX Runtime graph: offline batches of windows on a CPU.

Why: offline (``replay-eval``'s batched pipeline) the heads' attention over every window is the
largest cost for small windows, and PyTorch runs it through MKL, whose fp32 kernels are the AVX2
ones on AMD CPUs (:mod:`.onednn`).  ONNX Runtime's MLAS does not have that handicap.  The graph
also computes less: the heads mean-pool the attention output, and the mean over the queries of
``softmax(Q K^T) V`` is ``(mean of the softmax rows) V``, so ``P V`` (a second ``N x N x d``
product per window) becomes a column mean and one ``1 x N`` product.

Same arithmetic as :meth:`~step_ros.model.heads.StepHead.forward_indexed` (each frame projected
once, the positions' share added per window, the CLS row in front), equal to float32 rounding;
a test holds it to the PyTorch forward.  Weights are baked into the graph when it is made:
make a new one after changing a head.  Memory: the score matrices of one call, ``P H N^2``
floats; :meth:`OnnxIndexedHead.__call__` splits the windows into calls of at most
:data:`SCORES_BYTES`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .fast_kernels import cpu_session_options, resolve_kernels
from .heads import StepHead, pool_patch_grid, select_tokens

__all__ = ["SCORES_BYTES", "OnnxIndexedHead", "indexed_heads", "indexed_onnx_unsupported"]

#: Score matrices per ONNX Runtime call at most (the windows of a batch are split to fit).
SCORES_BYTES = 64 << 20


def indexed_onnx_unsupported(head: Any) -> str | None:
    """Why ``head`` has no ONNX graph here (None: it has): the cases where ``forward_indexed``
    itself falls back to the plain forward."""
    if not isinstance(head, StepHead):
        return f"{type(head).__name__} is not a STEP head"
    if head.block != "attention":
        return f"block={head.block!r}"
    if head.pe != "none" and head.pe_position != "before":
        return f"pe_position={head.pe_position!r}"
    return None


class OnnxIndexedHead:
    """``(frames (U, 1 + n, D), index (P, T)) -> logits (P, C)`` through ONNX Runtime (CPU)."""

    def __init__(self, head: StepHead, threads: int | None = None) -> None:
        why = indexed_onnx_unsupported(head)
        if why is not None:
            raise ValueError(f"no ONNX graph for this head: {why}")
        import onnxruntime as ort

        self.head = head
        self.num_heads = head.attn.num_heads
        self._ort, self._opts = ort, cpu_session_options(threads)
        self._sessions: dict[int, Any] = {}  # by tokens per frame (the graph's positions are per token)

    @torch.inference_mode()
    def _graph(self, m: int) -> Any:
        """The graph for frames of ``m`` (pooled) tokens: inputs ``x`` (U m, D) and ``tok`` (P, N),
        each window's rows of the projected table (CLS row last, at U m)."""
        from onnx import TensorProto, helper, numpy_helper

        head = self.head
        attn = head.attn
        D = attn.qkv.in_features
        H = attn.num_heads
        dh = D // H
        T = head.frames
        w = attn.qkv.weight.detach().double().cpu().clone()  # (3D, D), rows q | k | v
        b = attn.qkv.bias.detach().double().cpu().clone()
        w[:D] /= math.sqrt(dh)  # the score scale, folded into the query side
        b[:D] /= math.sqrt(dh)
        pe = head.positional()
        pos = b.expand(T, m, 3 * D) if pe is None else (pe.detach().double().cpu() @ w.t() + b).expand(T, m, 3 * D)
        rows = [pos.reshape(T * m, 3 * D)]
        cls = head.global_cls is not None
        if cls:  # the CLS row's bias is in its table row: nothing to add
            rows.insert(0, torch.zeros(1, 3 * D, dtype=torch.float64))
        consts = {
            "W": w.t().reshape(D, 3 * H, dh).permute(1, 0, 2),  # (3H, D, dh): tables come out head-major
            "pos": torch.cat(rows).reshape(-1, 3 * H, dh).permute(1, 0, 2)[:, None],  # (3H, 1, N, dh)
            "Wp": attn.proj.weight.detach().double().cpu(),
            "bp": attn.proj.bias.detach().double().cpu(),
            "Wc": head.classifier.weight.detach().double().cpu(),
            "bc": head.classifier.bias.detach().double().cpu(),
        }
        if cls:
            consts["cls"] = (head.global_cls.detach().double().cpu().reshape(1, D) @ w.t() + b).reshape(3 * H, 1, dh)
        inits = [numpy_helper.from_array(t.float().contiguous().numpy(), name) for name, t in consts.items()]
        inits.append(helper.make_tensor("pooled", TensorProto.INT64, [2], [-1, D]))
        node = helper.make_node
        nodes = [node("MatMul", ["x", "W"], ["proj"])]  # every frame projected once: (3H, U m, dh)
        nodes.append(node("Concat", ["proj", "cls"], ["table"], axis=1) if cls else node("Identity", ["proj"], ["table"]))
        nodes.append(node("Split", ["table"], ["table_q", "table_k", "table_v"], axis=0))  # three (H, U m [+1], dh)
        nodes.append(node("Split", ["pos"], ["pos_q", "pos_k", "pos_v"], axis=0))
        for name in "qkv":  # the windows' rows, gathered once, plus their positions' share
            nodes += [node("Gather", [f"table_{name}", "tok"], [f"{name}_rows"], axis=1),  # (H, P, N, dh)
                      node("Add", [f"{name}_rows", f"pos_{name}"], [name])]
        nodes += [
            node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]),  # fused into the MatMul by ORT
            node("MatMul", ["q", "kT"], ["scores"]),  # (H, P, N, N)
            node("Softmax", ["scores"], ["weights"], axis=-1),
            node("ReduceMean", ["weights"], ["column_mean"], axes=[2], keepdims=1),  # (H, P, 1, N)
            node("MatMul", ["column_mean", "v"], ["out"]),  # (H, P, 1, dh): the mean over queries of P V
            node("Transpose", ["out"], ["out_p"], perm=[1, 2, 0, 3]),  # (P, 1, H, dh)
            node("Reshape", ["out_p", "pooled"], ["out_flat"]),  # (P, D), heads concatenated
            node("Gemm", ["out_flat", "Wp", "bp"], ["projected"], transB=1),
            node("Gemm", ["projected", "Wc", "bc"], ["logits"], transB=1),
        ]
        graph = helper.make_graph(
            nodes, "step_head_indexed",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["Um", D]),
             helper.make_tensor_value_info("tok", TensorProto.INT64, ["P", (1 if cls else 0) + T * m])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["P", head.classifier.out_features])],
            initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    def _session(self, m: int) -> Any:
        if m not in self._sessions:
            self._sessions[m] = self._ort.InferenceSession(self._graph(m).SerializeToString(), self._opts,
                                                           providers=["CPUExecutionProvider"])
        return self._sessions[m]

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of the windows ``frames[index[w]]`` (as ``StepHead.forward_indexed``)."""
        head = self.head
        x = pool_patch_grid(select_tokens(frames[:, None], head.tokens), head.token_pool)[:, 0]
        u, m, d = x.shape
        x = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()).reshape(u * m, d)
        idx = index.detach().cpu().numpy().astype(np.int64, copy=False)
        if idx.ndim != 2 or idx.shape[1] != head.frames:
            raise ValueError(f"head expects {head.frames} frames, windows have {tuple(idx.shape)}")
        tok = (idx[:, :, None] * m + np.arange(m)).reshape(len(idx), -1)  # frame f, token j -> table row f m + j
        if head.global_cls is not None:
            tok = np.concatenate([np.full((len(idx), 1), u * m), tok], axis=1)  # the CLS row, first
        n = tok.shape[1]
        session = self._session(m)
        per_call = max(1, SCORES_BYTES // (4 * self.num_heads * n * n))
        out = [session.run(None, {"x": x, "tok": tok[i:i + per_call]})[0] for i in range(0, len(tok), per_call)]
        return torch.from_numpy(np.concatenate(out) if len(out) > 1 else out[0]).to(frames.device)


def indexed_heads(heads: Mapping[str, Any], kernels: str = "auto") -> tuple[dict[str, Any], str]:
    """``{task: (frames, index) -> logits}`` for a batch of windows that share frames, and who
    runs them (``torch`` or ``onnxruntime``; ``auto``: ONNX Runtime for heads on the CPU when it
    is installed).  Heads without a graph here keep their own ``forward_indexed`` (or forward)."""
    heads = dict(heads.items())  # a model's ModuleDict, or a plain mapping
    device = next((p.device for h in heads.values() for p in h.parameters()), torch.device("cpu"))
    name = resolve_kernels(kernels, device)
    if name == "native":  # the compiled kernels are the streaming engine's: batches of windows use PyTorch
        name = "torch"
    if name == "auto":  # these graphs took 1.5 against 3.6 ms (AMD VM, DECISIONS 34)
        try:
            import onnxruntime  # noqa: F401

            name = "onnxruntime"
        except ImportError:
            name = "torch"
    out: dict[str, Any] = {}
    for task, head in heads.items():
        if name == "onnxruntime" and indexed_onnx_unsupported(head) is None:
            out[task] = OnnxIndexedHead(head)
        elif hasattr(head, "forward_indexed"):
            out[task] = head.forward_indexed
        else:
            out[task] = lambda frames, index, head=head: head(frames[index])
    return out, name
