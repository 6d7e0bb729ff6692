"""The fused-linear family: linear + activation, the feed-forward, the SwiGLU projection
``silu(x Wg^T + bg) * (x Wu^T + bu)`` and the Llama feed-forward
``(silu(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd (+ residual)``: validation, dispatch, autograd,
torch.library registration. The activation of linear_act and feed_forward is GeLU (exact or tanh)
or ReLU, named by the strings of ``lightllm.kernels.fused_linear.ACTIVATIONS`` ("gelu",
"gelu_tanh", "relu"). ``w_gate`` and ``w_up`` stay separate (the ``nn.Linear`` layouts of
``gate_proj``/``up_proj``): the gated matmul reads both, never a concatenated copy.

Eight custom ops carry the work on 2-D (rows, features) views:
  lightllm::linear_act_fwd(x, weight, bias?, activation, save_pre)         -> (y, pre)
  lightllm::linear_act_bwd(dy, x, weight, pre, activation, need_dx, need_dw, need_db)
                                                                            -> (dx, dw, db)
  lightllm::feed_forward_fwd(x, w1, b1?, w2, b2?, residual?, activation, save) -> (y, h, pre)
  lightllm::feed_forward_bwd(dy, x, w1, w2, h, pre, activation, need_dx, need_dw1, need_db1,
                             need_dw2, need_db2)                  -> (dx, dw1, db1, dw2, db2)
  lightllm::linear_swiglu_fwd(x, w_gate, w_up, b_gate?, b_up?, save)          -> (h, g, u)
  lightllm::linear_swiglu_bwd(dh, x, w_gate, w_up, g, u, need_dx, need_dw_gate, need_dw_up,
                              need_db_gate, need_db_up)   -> (dx, dw_gate, dw_up, db_gate, db_up)
  lightllm::swiglu_feed_forward_fwd(x, w_gate, w_up, w_down, b_gate?, b_up?, b_down?, residual?,
                                    save)                                      -> (y, h, g, u)
  lightllm::swiglu_feed_forward_bwd(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dw_gate,
                                    need_dw_up, need_dw_down, need_db_gate, need_db_up,
                                    need_db_down)
                       -> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down)
``pre``/``h`` (SwiGLU: ``g``/``u`` and the feed-forward's ``h``) are returned only when a backward
will need them (else empty; a backward reached anyway recomputes them) and are marked
non-differentiable; unneeded gradients come back empty.

Launchers: the Triton kernels (``lightllm.kernels.fused_linear``: CUDA, and CPU under the
interpreter) or, on the native CPU path and for float64, the same seven functions on PyTorch's own
ops (addmm with the activation, or SwiGLU's silu, applied in place when no backward needs the
pre-activations). The public functions pick one per call and, in plain eager mode, call it
directly (through an ``autograd.Function`` when a gradient is needed); under ``torch.compile`` or
a dispatch mode they call the custom ops. Both routes share the autograd functions below.

Backward design: the forward *saves* the pre-activation (one extra (M, N) write, only when a gradient
is required) instead of recomputing it. Saving costs a write and a read of M·N elements (2·M·N·e
bytes); recomputing costs a matmul, 2·M·N·K FLOPs (a third of the layer's training work). Saving
wins whenever K > e · (matmul rate) / (bandwidth), about 470 for bf16 on an H100 (~700 TFLOP/s,
~3 TB/s); every target width (d_model >= 768) is above that. Eager PyTorch keeps the same tensor
for F.gelu's backward, so peak memory matches eager. Then:
  linear_act:    dPre = dY * act'(pre) (one elementwise Triton pass, db's partial sums fused),
                 dX = dPre @ W, dW = dPre^T @ X (cuBLAS via torch.matmul: plain matmuls).
  feed_forward:  dW2 = dY^T @ H, db2 = sum(dY), dR = dY;
                 dPre = (dY @ W2) * act'(pre) in the Triton matmul's epilogue (dH never stored);
                 dX = dPre @ W1, dW1 = dPre^T @ X, db1 = sum(dPre).
SwiGLU saves g and u the same way (two extra (M, d_ff) writes): saving costs 4·M·F·e bytes,
recomputing the gated matmul 4·M·F·K FLOPs, so the same bound holds; Llama widths
(d_model >= 2048) are far above it. Eager PyTorch keeps more: g (silu's input), silu(g) and u (the
product's inputs) and h. The feed-forward also keeps h = silu(g) * u, the down projection's input,
which its forward writes anyway (dW_down = dY^T H needs it as a matmul operand). Then, with
s = sigmoid(g):
  linear_swiglu:  dG = dH * u * (s + g s (1 - s)), dU = dH * g s — one elementwise Triton pass
                  reading dH, g, u once, with both db's partial sums fused;
  feed-forward:   dW_down = dY^T H, db_down = sum(dY), dR = dY; dG and dU in the epilogue of the
                  Triton matmul dH = dY @ W_down (dH never stored: one accumulator, two outputs);
  both:           dX = dG @ Wg + dU @ Wu (the second product accumulated onto the first by addmm),
                  dWg = dG^T X, dWu = dU^T X, db's as column sums (cuBLAS via torch.matmul).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import check_broadcastable, dtype_error, shape_error, tensor_error
from lightllm.kernels import fused_linear as kernel
from lightllm.reference import fused_linear as reference

ACTIVATIONS = tuple(kernel.ACTIVATIONS)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernels, or PyTorch's native ops (same signatures)
# ------------------------------------------------------------------------------------------------


def _native_linear_act_fwd(x, weight, bias, activation: str, save_pre: bool):
    pre = F.linear(x, weight, bias)
    if save_pre:
        return reference.activate(pre, activation), pre
    if activation == "relu":
        return pre.relu_(), None
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch._C._nn.gelu_(pre, approximate=approximate), None


def _native_linear_fwd(x, weight, bias, residual):
    y = F.linear(x, weight, bias)
    return y if residual is None else y.add_(residual)


def _native_linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save: bool):
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    if save:
        return F.silu(g) * u, g, u
    return torch._C._nn.silu_(g).mul_(u), None, None


_NATIVE = SimpleNamespace(
    linear_act_fwd=_native_linear_act_fwd, linear_fwd=_native_linear_fwd,
    matmul_act_grad=reference.matmul_act_grad, act_bwd=reference.act_bwd,
    linear_swiglu_fwd=_native_linear_swiglu_fwd, matmul_swiglu_grad=reference.matmul_swiglu_grad,
    swiglu_bwd=reference.swiglu_bwd,
)
_SWIGLU = "SwiGLU"  # what the float64 warning of the SwiGLU ops names


def _kernel_serves(x: Tensor) -> bool:
    """The Triton kernels serve ``x``: CUDA, or CPU under the interpreter; never float64."""
    return x.dtype is not torch.float64 and _dispatch.runs_triton(x)


def launchers(x: Tensor, what: str = "linear + activation"):
    """The Triton launchers where the kernels serve ``x``, else ``_NATIVE`` (the namespace of the
    same launchers on PyTorch's ops; looked up per call, so a test can wrap a launcher). float64
    has no Triton path: a one-time warning names ``what``."""
    if _kernel_serves(x):
        return kernel
    if x.dtype is torch.float64 and _dispatch.triton_runs_on(x.device):
        _dispatch.warn_once(f"{what}:float64", f"{what}: float64 has no Triton path; running "
                            "PyTorch's own ops instead")
    return _NATIVE


def empty(x: Tensor) -> Tensor:
    """The empty tensor a custom op returns for an output it does not compute."""
    return x.new_empty((0,))


def _transposed(weight: Tensor) -> bool:
    """``weight`` (out, in) is stored transposed: the ``.t()`` view of a contiguous (in, out)
    buffer, as GPT-2's ``Conv1D`` weight is passed."""
    return weight.stride(0) == 1 and weight.stride(1) != 1


def weight_grad(dout: Tensor, inp: Tensor, weight: Tensor) -> Tensor:
    """``dout^T @ inp`` (out, in) in ``weight``'s layout. For a transposed weight the product is
    computed as the contiguous (in, out) ``inp^T @ dout`` and returned as its ``.t()`` view, so
    autograd hands the stored parameter a gradient in its own layout (``AccumulateGrad`` then
    keeps it instead of copying it, and ``.t()``'s backward is a view)."""
    if _transposed(weight):
        return torch.mm(inp.t(), dout).t()
    return torch.mm(dout.t(), inp)


def grad_like(x: Tensor, weight: Tensor, need: bool = True) -> Tensor:
    """The fake of :func:`weight_grad`: ``weight``'s shape and layout (empty unless ``need``)."""
    if not need:
        return x.new_empty((0,))
    if _transposed(weight):
        return x.new_empty((weight.shape[1], weight.shape[0])).t()
    return x.new_empty(weight.shape)


# ------------------------------------------------------------------------------------------------
# linear + activation
# ------------------------------------------------------------------------------------------------


def _linear_act_fwd_impl(x, weight, bias, activation, save_pre):
    y, pre = launchers(x).linear_act_fwd(x, weight, bias, activation, save_pre)
    return y, pre if pre is not None else empty(x)


def _linear_act_bwd_impl(dy, x, weight, pre, activation, need_dx, need_dw, need_db):
    dpre, db = launchers(pre).act_bwd(dy, pre, activation, need_db)
    dx = torch.matmul(dpre, weight) if need_dx else empty(x)
    dw = weight_grad(dpre, x, weight) if need_dw else empty(x)
    return dx, dw, db.to(pre.dtype) if need_db else empty(x)


@torch.library.custom_op("lightllm::linear_act_fwd", mutates_args=())
def _linear_act_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_pre: bool
) -> tuple[Tensor, Tensor]:
    return _linear_act_fwd_impl(x, weight, bias, activation, save_pre)


@_linear_act_fwd.register_fake
def _(x, weight, bias, activation, save_pre):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@torch.library.custom_op("lightllm::linear_act_bwd", mutates_args=())
def _linear_act_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, pre: Tensor, activation: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_act_bwd_impl(dy, x, weight, pre, activation, need_dx, need_dw, need_db)


@_linear_act_bwd.register_fake
def _(dy, x, weight, pre, activation, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape if need_dx else (0,)),
            grad_like(x, weight, need_dw),
            x.new_empty((weight.shape[0],) if need_db else (0,)))


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, save_pre = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.save_for_backward(x, weight, bias, pre)
    ctx.activation = activation
    ctx.saved_pre = save_pre
    ctx.has_bias = bias is not None


def _linear_act_backward(ctx, dy, _dpre):
    if dy is None:
        return None, None, None, None, None
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    x, weight, bias, pre = ctx.saved_tensors
    direct = _dispatch.direct(dy)
    if not ctx.saved_pre:  # called without save_pre (never by linear_gelu): recompute it
        fwd = _linear_act_fwd_impl if direct else _linear_act_fwd
        _, pre = fwd(x, weight, bias, ctx.activation, True)
    bwd = _linear_act_bwd_impl if direct else _linear_act_bwd
    dx, dw, db = bwd(dy, x, weight, pre, ctx.activation, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None)


_linear_act_fwd.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


_LinearAct = _dispatch.autograd_function("linear_act", _linear_act_fwd_impl,
                                           _linear_act_setup, _linear_act_backward)


# ------------------------------------------------------------------------------------------------
# feed_forward
# ------------------------------------------------------------------------------------------------


def _feed_forward_fwd_impl(x, w1, b1, w2, b2, residual, activation, save):
    launcher = launchers(x)
    h, pre = launcher.linear_act_fwd(x, w1, b1, activation, save)
    y = launcher.linear_fwd(h, w2, b2, residual)
    if not save:
        return y, empty(x), empty(x)
    return y, h, pre


def _feed_forward_bwd_impl(dy, x, w1, w2, h, pre, activation,
                           need_dx, need_dw1, need_db1, need_dw2, need_db2):
    dw2 = weight_grad(dy, h, w2) if need_dw2 else empty(x)
    db2 = dy.sum(0) if need_db2 else empty(x)
    dx, dw1, db1 = empty(x), empty(x), empty(x)  # distinct: outputs may not alias each other
    if need_dx or need_dw1 or need_db1:
        dpre = launchers(x).matmul_act_grad(dy, w2, pre, activation)
        if need_dx:
            dx = torch.matmul(dpre, w1)
        if need_dw1:
            dw1 = weight_grad(dpre, x, w1)
        if need_db1:
            db1 = dpre.sum(0)
    return dx, dw1, db1, dw2, db2


@torch.library.custom_op("lightllm::feed_forward_fwd", mutates_args=())
def _feed_forward_fwd(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    residual: Tensor | None, activation: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _feed_forward_fwd_impl(x, w1, b1, w2, b2, residual, activation, save)


@_feed_forward_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, activation, save):
    hidden = (x.shape[0], w1.shape[0]) if save else (0,)
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden)


@torch.library.custom_op("lightllm::feed_forward_bwd", mutates_args=())
def _feed_forward_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, pre: Tensor, activation: str,
    need_dx: bool, need_dw1: bool, need_db1: bool, need_dw2: bool, need_db2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _feed_forward_bwd_impl(dy, x, w1, w2, h, pre, activation,
                                  need_dx, need_dw1, need_db1, need_dw2, need_db2)


@_feed_forward_bwd.register_fake
def _(dy, x, w1, w2, h, pre, activation, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (out(need_dx, x.shape), grad_like(x, w1, need_dw1), out(need_db1, (w1.shape[0],)),
            grad_like(x, w2, need_dw2), out(need_db2, (w2.shape[0],)))


def _feed_forward_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, save = inputs
    _, h, pre = output
    ctx.mark_non_differentiable(h, pre)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.save_for_backward(x, w1, b1, w2, h, pre)
    ctx.activation = activation
    ctx.saved = save
    ctx.has_b1 = b1 is not None
    ctx.has_b2 = b2 is not None


def _feed_forward_backward(ctx, dy, _dh, _dpre):
    if dy is None:
        return (None,) * 8
    need = list(ctx.needs_input_grad[:6])  # x, w1, b1, w2, b2, residual
    need[2] = need[2] and ctx.has_b1
    need[4] = need[4] and ctx.has_b2
    grads = [None] * 5
    if any(need[:5]):
        x, w1, b1, w2, h, pre = ctx.saved_tensors
        direct = _dispatch.direct(dy)
        if not ctx.saved:  # called without save (never by feed_forward): recompute h and pre
            fwd = _linear_act_fwd_impl if direct else _linear_act_fwd
            h, pre = fwd(x, w1, b1, ctx.activation, True)
        bwd = _feed_forward_bwd_impl if direct else _feed_forward_bwd
        grads = bwd(dy, x, w1, w2, h, pre, ctx.activation, *need[:5])
        grads = [g if n else None for g, n in zip(grads, need[:5])]
    # The residual is added to the output: its gradient is dY itself.
    return (*grads, dy if need[5] else None, None, None)


_feed_forward_fwd.register_autograd(_feed_forward_backward, setup_context=_feed_forward_setup)


_FeedForward = _dispatch.autograd_function("feed_forward", _feed_forward_fwd_impl,
                                            _feed_forward_setup, _feed_forward_backward)


# ------------------------------------------------------------------------------------------------
# linear_swiglu
# ------------------------------------------------------------------------------------------------


def _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu):
    """dX = dG Wg + dU Wu, dWg = dG^T X, dWu = dU^T X (cuBLAS), empty where not needed."""
    dx = torch.matmul(dg, w_gate).addmm_(du, w_up) if need_dx else empty(x)
    dwg = weight_grad(dg, x, w_gate) if need_dwg else empty(x)
    dwu = weight_grad(du, x, w_up) if need_dwu else empty(x)
    return dx, dwg, dwu


def _linear_swiglu_fwd_impl(x, w_gate, w_up, b_gate, b_up, save):
    h, g, u = launchers(x, _SWIGLU).linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save)
    return (h, g, u) if save else (h, empty(x), empty(x))


def _linear_swiglu_bwd_impl(dh, x, w_gate, w_up, g, u, need_dx, need_dwg, need_dwu, need_dbg,
                            need_dbu):
    dg, du, dbg, dbu = launchers(g, _SWIGLU).swiglu_bwd(dh, g, u, need_dbg or need_dbu)
    dx, dwg, dwu = _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu)
    return (dx, dwg, dwu, dbg.to(g.dtype) if need_dbg else empty(x),
            dbu.to(g.dtype) if need_dbu else empty(x))


@torch.library.custom_op("lightllm::linear_swiglu_fwd", mutates_args=())
def _linear_swiglu_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_swiglu_fwd_impl(x, w_gate, w_up, b_gate, b_up, save)


@_linear_swiglu_fwd.register_fake
def _(x, w_gate, w_up, b_gate, b_up, save):
    shape = (x.shape[0], w_gate.shape[0])
    saved = shape if save else (0,)
    return x.new_empty(shape), x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("lightllm::linear_swiglu_bwd", mutates_args=())
def _linear_swiglu_bwd(
    dh: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, g: Tensor, u: Tensor,
    need_dx: bool, need_dw_gate: bool, need_dw_up: bool, need_db_gate: bool, need_db_up: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _linear_swiglu_bwd_impl(dh, x, w_gate, w_up, g, u, need_dx, need_dw_gate, need_dw_up,
                                   need_db_gate, need_db_up)


def _fake_grads(x, weights, needs):
    """Fake gradients of (x, *weights, *their biases) in that order; empty where not needed."""
    k = len(weights)
    dx = x.new_empty(x.shape if needs[0] else (0,))
    dws = [grad_like(x, w, n) for w, n in zip(weights, needs[1:1 + k])]
    dbs = [x.new_empty((w.shape[0],) if n else (0,)) for w, n in zip(weights, needs[1 + k:])]
    return (dx, *dws, *dbs)


@_linear_swiglu_bwd.register_fake
def _(dh, x, w_gate, w_up, g, u, *needs):
    return _fake_grads(x, (w_gate, w_up), needs)


def _linear_swiglu_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, save = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.save_for_backward(x, w_gate, w_up, b_gate, b_up, g, u)
    ctx.saved = save
    ctx.has_biases = (b_gate is not None, b_up is not None)


def _linear_swiglu_backward(ctx, dh, _dg, _du):
    if dh is None:
        return (None,) * 6
    need = list(ctx.needs_input_grad[:5])  # x, w_gate, w_up, b_gate, b_up
    need[3] = need[3] and ctx.has_biases[0]
    need[4] = need[4] and ctx.has_biases[1]
    if not any(need):
        return None, None, None, None, None, None
    x, w_gate, w_up, b_gate, b_up, g, u = ctx.saved_tensors
    direct = _dispatch.direct(dh)
    if not ctx.saved:  # called without save (never by linear_swiglu): recompute g and u
        fwd = _linear_swiglu_fwd_impl if direct else _linear_swiglu_fwd
        _, g, u = fwd(x, w_gate, w_up, b_gate, b_up, True)
    bwd = _linear_swiglu_bwd_impl if direct else _linear_swiglu_bwd
    grads = bwd(dh, x, w_gate, w_up, g, u, *need)
    return (*(gr if n else None for gr, n in zip(grads, need)), None)


_linear_swiglu_fwd.register_autograd(_linear_swiglu_backward, setup_context=_linear_swiglu_setup)

_LinearSwiGLU = _dispatch.autograd_function("linear_swiglu", _linear_swiglu_fwd_impl,
                                             _linear_swiglu_setup, _linear_swiglu_backward)


# ------------------------------------------------------------------------------------------------
# swiglu_feed_forward
# ------------------------------------------------------------------------------------------------


def _swiglu_ff_fwd_impl(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save):
    launcher = launchers(x, _SWIGLU)
    h, g, u = launcher.linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save)
    y = launcher.linear_fwd(h, w_down, b_down, residual)
    if not save:
        return y, empty(x), empty(x), empty(x)
    return y, h, g, u


def _swiglu_ff_bwd_impl(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dwg, need_dwu,
                        need_dwd, need_dbg, need_dbu, need_dbd):
    dwd = weight_grad(dy, h, w_down) if need_dwd else empty(x)
    dbd = dy.sum(0) if need_dbd else empty(x)
    # distinct empties: op outputs may not alias each other
    dx, dwg, dwu, dbg, dbu = empty(x), empty(x), empty(x), empty(x), empty(x)
    if need_dx or need_dwg or need_dwu or need_dbg or need_dbu:
        dg, du = launchers(x, _SWIGLU).matmul_swiglu_grad(dy, w_down, g, u)
        dx, dwg, dwu = _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu)
        if need_dbg:
            dbg = dg.sum(0)
        if need_dbu:
            dbu = du.sum(0)
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


@torch.library.custom_op("lightllm::swiglu_feed_forward_fwd", mutates_args=())
def _swiglu_ff_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, residual: Tensor | None, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _swiglu_ff_fwd_impl(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save)


@_swiglu_ff_fwd.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save):
    hidden = (x.shape[0], w_gate.shape[0]) if save else (0,)
    return (x.new_empty((x.shape[0], w_down.shape[0])), x.new_empty(hidden), x.new_empty(hidden),
            x.new_empty(hidden))


@torch.library.custom_op("lightllm::swiglu_feed_forward_bwd", mutates_args=())
def _swiglu_ff_bwd(
    dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, h: Tensor, g: Tensor,
    u: Tensor, need_dx: bool, need_dw_gate: bool, need_dw_up: bool, need_dw_down: bool,
    need_db_gate: bool, need_db_up: bool, need_db_down: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _swiglu_ff_bwd_impl(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dw_gate,
                               need_dw_up, need_dw_down, need_db_gate, need_db_up, need_db_down)


@_swiglu_ff_bwd.register_fake
def _(dy, x, w_gate, w_up, w_down, h, g, u, *needs):
    return _fake_grads(x, (w_gate, w_up, w_down), needs)


def _swiglu_ff_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save = inputs
    _, h, g, u = output
    ctx.mark_non_differentiable(h, g, u)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.save_for_backward(x, w_gate, w_up, w_down, b_gate, b_up, h, g, u)
    ctx.saved = save
    ctx.has_biases = (b_gate is not None, b_up is not None, b_down is not None)


def _swiglu_ff_backward(ctx, dy, _dh, _dg, _du):
    if dy is None:
        return (None,) * 9
    need = list(ctx.needs_input_grad[:8])  # x, w_gate, w_up, w_down, 3 biases, residual
    for i, has in enumerate(ctx.has_biases, 4):
        need[i] = need[i] and has
    grads = [None] * 7
    if any(need[:7]):
        x, w_gate, w_up, w_down, b_gate, b_up, h, g, u = ctx.saved_tensors
        direct = _dispatch.direct(dy)
        if not ctx.saved:  # called without save (never by swiglu_feed_forward): recompute
            fwd = _linear_swiglu_fwd_impl if direct else _linear_swiglu_fwd
            h, g, u = fwd(x, w_gate, w_up, b_gate, b_up, True)
        bwd = _swiglu_ff_bwd_impl if direct else _swiglu_ff_bwd
        grads = bwd(dy, x, w_gate, w_up, w_down, h, g, u, *need[:7])
        grads = [gr if n else None for gr, n in zip(grads, need[:7])]
    # The residual is added to the output: its gradient is dY itself.
    return (*grads, dy if need[7] else None, None)


_swiglu_ff_fwd.register_autograd(_swiglu_ff_backward, setup_context=_swiglu_ff_setup)

_SwiGLUFeedForward = _dispatch.autograd_function("swiglu_feed_forward", _swiglu_ff_fwd_impl,
                                                  _swiglu_ff_setup, _swiglu_ff_backward)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


APPROXIMATIONS = ("none", "tanh")
FEED_FORWARD_ACTIVATIONS = ("gelu", "relu")


def _gelu_activation(op: str, approximate) -> str:
    """The activation name of ``F.gelu(approximate=...)``."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise tensor_error(op, name, t)
    if t.dtype not in _DTYPES:
        raise dtype_error(op, name, t.dtype, _DTYPES)


def _check_like(op: str, name: str, t: Tensor, x: Tensor) -> None:
    """``t`` has ``x``'s dtype and device (the message names both)."""
    if t.device != x.device:
        raise RuntimeError(f"{op}: expected all tensors on one device, got x={x.device}, "
                           f"{name}={t.device}")
    if t.dtype is not x.dtype:
        raise TypeError(f"{op}: expected all tensors of one dtype, got x={x.dtype}, "
                        f"{name}={t.dtype}")


def check_weight(op: str, wn: str, weight, bn: str, bias, x: Tensor, in_features: int,
                 source: str | None = None) -> None:
    """``weight`` is a 2-D (out_features, in_features) tensor like ``x`` whose in_features equals
    ``in_features`` (named ``source`` in messages; by default x's last dimension); ``bias`` is None
    or (out_features,)."""
    _check_tensor(op, wn, weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: {wn} must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != in_features:
        source = source or f"the last dimension of x (shape {tuple(x.shape)})"
        raise ValueError(f"{op}: {wn} of shape {tuple(weight.shape)} expects in_features="
                         f"{weight.shape[1]}, but {source} is {in_features}")
    _check_like(op, wn, weight, x)
    if bias is not None:
        _check_tensor(op, bn, bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise shape_error(op, bn, bias, (weight.shape[0],))
        _check_like(op, bn, bias, x)


def check_x(op: str, x) -> None:
    _check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimensions, got shape {tuple(x.shape)}")


def rows(op: str, x: Tensor, residual, d_out: int):
    """``x`` as 2-D rows (m, in_features) and ``residual`` (checked: broadcastable to the output
    (..., d_out), x's dtype and device) as (m, d_out); and whether the result must be viewed back
    to x's leading dimensions. Shared by the feed-forwards."""
    flat = x.dim() != 2
    if residual is not None:
        _check_tensor(op, "residual", residual)
        out_shape = (*x.shape[:-1], d_out)
        if residual.shape != out_shape:
            check_broadcastable(op, "residual", residual, out_shape)
            residual = residual.expand(out_shape)
            flat = True
        _check_like(op, "residual", residual, x)
    m = math.prod(x.shape[:-1]) if flat else x.shape[0]
    x2d = x.reshape(m, x.shape[-1]) if flat else x
    r2d = residual.reshape(m, d_out) if flat and residual is not None else residual
    return x2d, r2d, flat


def _check_gate_up(op: str, x: Tensor, w_gate, w_up, b_gate, b_up) -> None:
    """w_gate (d_ff, d_model) and w_up of the same shape, their biases (d_ff,), all like x."""
    check_x(op, x)
    check_weight(op, "w_gate", w_gate, "b_gate", b_gate, x, x.shape[-1])
    # Before w_up's own checks: a w_up of another d_ff is named as such, not by its bias.
    if isinstance(w_up, Tensor) and w_up.dim() == 2 and w_up.shape[0] != w_gate.shape[0]:
        raise ValueError(f"{op}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got "
                         f"{tuple(w_up.shape)}")
    check_weight(op, "w_up", w_up, "b_up", b_up, x, x.shape[-1])


def _linear_act(op: str, x, weight, bias, activation: str) -> Tensor:
    check_x(op, x)
    check_weight(op, "weight", weight, "bias", bias, x, x.shape[-1])
    flat = x.dim() != 2
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    if not _dispatch.direct(x):
        save = _dispatch.needs_grad(x, weight, bias)
        y = _linear_act_fwd(x2d, weight, bias, activation, save)[0]
    elif _dispatch.needs_grad(x, weight, bias):
        y = _LinearAct.apply(x2d, weight, bias, activation, True)[0]
    else:
        y = launchers(x).linear_act_fwd(x2d, weight, bias, activation, False)[0]
    return y.view(*x.shape[:-1], weight.shape[0]) if flat else y


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               activation: str = "gelu") -> Tensor:
    """``act(F.linear(x, weight, bias))`` for an activation named as in ``ACTIVATIONS`` ("gelu",
    "gelu_tanh", "relu"): the one entry the modules and ``lightllm.patch`` share."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _linear_act("linear_act", x, weight, bias, activation)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)`` as one Triton matmul whose
    epilogue adds the bias and applies GeLU (exact erf form, or ``approximate="tanh"``).

    ``x`` is (..., in_features) with any leading dims and strides: a layout that cannot be
    viewed as 2-D is copied by ``reshape``, and a 2-D view with no unit stride (e.g. a strided
    slice) is copied by the launcher, so the kernels' loads stay contiguous. ``weight`` is
    (out_features, in_features) with any strides (a transposed (in, out) buffer such as GPT-2's
    ``Conv1D`` weight passes as ``weight.t()`` without a copy), ``bias`` (out_features,); all of
    one floating dtype and device. On the native CPU path (and for float64) it is PyTorch's addmm
    and GeLU. Forward and backward.
    """
    return _linear_act("linear_gelu", x, weight, bias, _gelu_activation("linear_gelu", approximate))


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.relu(F.linear(x, weight, bias))`` with the bias and ReLU in the matmul's epilogue;
    shapes, layouts and dispatch as :func:`linear_gelu`. Forward and backward."""
    return _linear_act("linear_relu", x, weight, bias, "relu")


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                 approximate: str = "none", residual: Tensor | None = None,
                 activation: str = "gelu") -> Tensor:
    """The feed-forward ``F.linear(act(F.linear(x, w1, b1)), w2, b2) (+ residual)``: two Triton
    matmuls, the first with bias + activation in its epilogue, the second adding b2 and the
    residual in its epilogue. ``activation`` is ``"gelu"`` (``approximate`` as in ``F.gelu``) or
    ``"relu"``.

    ``w1`` is (d_ff, d_model), ``w2`` (d_model, d_ff) (the ``nn.Linear`` layouts, any strides);
    ``residual`` broadcasts to the output (..., d_model) and has the dtype of ``x``.
    """
    op = "feed_forward"
    check_x(op, x)
    check_weight(op, "w1", w1, "b1", b1, x, x.shape[-1])
    check_weight(op, "w2", w2, "b2", b2, x, w1.shape[0], "w1's out_features (d_ff)")
    if activation == "relu":
        act = "relu"
    elif activation == "gelu":
        act = _gelu_activation(op, approximate)
    else:
        raise ValueError(f"{op}: activation must be 'gelu' or 'relu', got {activation!r}")
    d_model = w2.shape[0]
    x2d, r2d, flat = rows(op, x, residual, d_model)
    # h and pre are saved only when a weight-side gradient needs them (the residual's is dY).
    save = _dispatch.needs_grad(x, w1, b1, w2, b2)
    if not _dispatch.direct(x):
        y = _feed_forward_fwd(x2d, w1, b1, w2, b2, r2d, act, save)[0]
    elif save or _dispatch.needs_grad(residual):
        y = _FeedForward.apply(x2d, w1, b1, w2, b2, r2d, act, save)[0]
    else:
        launcher = launchers(x)
        h = launcher.linear_act_fwd(x2d, w1, b1, act, False)[0]
        y = launcher.linear_fwd(h, w2, b2, r2d)
    return y.view(*x.shape[:-1], d_model) if flat else y


def linear_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None,
                  b_up: Tensor | None = None) -> Tensor:
    """``F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)`` as one Triton matmul:
    each program reads its x tile once for both weights, keeps two fp32 accumulators, and its
    epilogue adds the biases and writes silu(g) * u (g and u reach memory only when a backward
    needs them).

    ``x`` is (..., d_model) with any leading dims and strides; ``w_gate`` and ``w_up`` are two
    separate (d_ff, d_model) tensors (the ``nn.Linear`` layouts of ``gate_proj``/``up_proj``, any
    strides; never concatenated), ``b_gate``/``b_up`` (d_ff,) or None each; all of one floating
    dtype and device. On the native CPU path (and for float64) it is PyTorch's addmm and SiLU.
    Forward and backward.
    """
    op = "linear_swiglu"
    _check_gate_up(op, x, w_gate, w_up, b_gate, b_up)
    flat = x.dim() != 2
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    if not _dispatch.direct(x):
        save = _dispatch.needs_grad(x, w_gate, w_up, b_gate, b_up)
        h = _linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up, save)[0]
    elif _dispatch.needs_grad(x, w_gate, w_up, b_gate, b_up):
        h = _LinearSwiGLU.apply(x2d, w_gate, w_up, b_gate, b_up, True)[0]
    else:
        h = launchers(x, _SWIGLU).linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up, False)[0]
    return h.view(*x.shape[:-1], w_gate.shape[0]) if flat else h


def swiglu_feed_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                        b_gate: Tensor | None = None, b_up: Tensor | None = None,
                        b_down: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """The SwiGLU feed-forward of Llama (transformers' ``LlamaMLP``):
    ``F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)
    (+ residual)`` as two Triton matmuls — the gated one (:func:`linear_swiglu`), then the down
    projection with b_down and the residual in its epilogue.

    ``w_gate``/``w_up`` are (d_ff, d_model), ``w_down`` (d_model, d_ff) (the ``nn.Linear``
    layouts, any strides); ``residual`` broadcasts to the output (..., d_model) and has the dtype
    of ``x``.
    """
    op = "swiglu_feed_forward"
    _check_gate_up(op, x, w_gate, w_up, b_gate, b_up)
    check_weight(op, "w_down", w_down, "b_down", b_down, x, w_gate.shape[0],
                 "w_gate's out_features (d_ff)")
    d_model = w_down.shape[0]
    x2d, r2d, flat = rows(op, x, residual, d_model)
    # h, g and u are saved only when a weight-side gradient needs them (the residual's is dY).
    save = _dispatch.needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if not _dispatch.direct(x):
        y = _swiglu_ff_fwd(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, r2d, save)[0]
    elif save or _dispatch.needs_grad(residual):
        y = _SwiGLUFeedForward.apply(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, r2d,
                                     save)[0]
    else:
        launcher = launchers(x, _SWIGLU)
        h = launcher.linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up, False)[0]
        y = launcher.linear_fwd(h, w_down, b_down, r2d)
    return y.view(*x.shape[:-1], d_model) if flat else y

