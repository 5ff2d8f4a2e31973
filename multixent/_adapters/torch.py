"""PyTorch adapter: the generic forward and closed-form backward as an autograd Function.

The forward saves only the logits (an input) and two per-row numbers, the shift
``m`` and ``log Σ exp(z - m)`` (not lse: ``exp(z - lse)`` loses float32 precision at
large logits); the backward computes the gradient block by block in place, in
its own buffer (no other logits-sized memory). When the backward itself is
being differentiated (``create_graph=True``) it recomputes everything with
differentiable operations in one block, so double backward works. Under
``torch.compile`` everything is one block (the compiler fuses it) and the
eager index check is skipped (out-of-range indices give NaN).

The Function has torch.func's form (``setup_context``, a ``jvp``, a generated
vmap rule): under a torch.func transform (``grad``, ``vmap``, ``jacrev``,
``jacfwd``, ``hessian``, ``jvp``; also ``is_grads_batched``) the math runs as
under autograd recording: one block, no ``out=``, no in-place update of a view.
Class weights that require grad get their true gradient
(:func:`multixent._math.row_losses_weight_vjp`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from .. import _math

#: Floating-point errors never warn here.
quiet = contextlib.nullcontext


def concrete(a: Any) -> Any:
    """``a`` when its values can be read: not while compiling, nor a batched (vmapped) tensor."""
    return None if torch.compiler.is_compiling() or _wrapped(a) else a


def _wrapped(a: Any) -> bool:
    """A tensor of a torch.func transform, or of the legacy vmap behind ``is_grads_batched``."""
    functorch = torch._C._functorch
    return isinstance(a, torch.Tensor) and (
        functorch.is_functorch_wrapped_tensor(a) or functorch.is_legacy_batchedtensor(a)
    )


def _transformed(*arrays: Any) -> bool:
    """Under a transform (not compiling): no ``out=``, no setitem into views, no in-place update of a batched tensor."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or any(_wrapped(a) for a in arrays)


def blocking(x: torch.Tensor, opts: _math.Options, *inputs: Any) -> tuple[int | None, _math.Options]:
    """Eager: blocks of rows computed in place; compiled or transformed: one block, out of place.

    ``inputs`` are the call's other arrays: out= refuses any that autograd
    records (cross_entropy_and_grad under grad mode), and then nothing is in place.
    """
    if torch.compiler.is_compiling() or _transformed(x, *inputs):
        return None, dataclasses.replace(opts, in_place=False)
    recorded = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, *inputs))
    in_place = not recorded
    return _math.block_rows_for(x.shape[-1]), dataclasses.replace(opts, in_place=in_place)


class _RowLosses(torch.autograd.Function):
    """``(ce, lse)`` per row, and the per-row stats ``(m, lse_s)`` the backward takes (not differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, target: torch.Tensor, weight: Any, opts: Any, xp: Any) -> Any:
        block_rows, eager_opts = blocking(x, opts, target, weight)
        return _math.row_losses(x, target, weight, eager_opts, xp=xp, block_rows=block_rows, keep_stats=True)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, target, weight, opts, xp = inputs
        _, _, shift, lse_shifted = output
        ctx.mark_non_differentiable(shift, lse_shifted)
        ctx.save_for_backward(x, target, weight, shift, lse_shifted)
        ctx.save_for_forward(x, target, weight)
        ctx.opts, ctx.xp = opts, xp

    @staticmethod
    def backward(ctx: Any, ce_bar: torch.Tensor, lse_bar: torch.Tensor, *_: Any) -> Any:
        x, target, weight, shift, lse_shifted = ctx.saved_tensors
        # create_graph=True or a transform: recompute lse and stay out of place, in one block
        differentiable = torch.is_grad_enabled() or _transformed(x, ce_bar, lse_bar)
        if differentiable:
            block_rows, opts = None, dataclasses.replace(ctx.opts, stop_gradient=torch.Tensor.detach, in_place=False)
        else:
            block_rows, opts = blocking(x, ctx.opts)
        x_bar, t_bar = _math.row_losses_vjp(
            x,
            target,
            weight,
            None if differentiable else (shift, lse_shifted),
            ce_bar,
            lse_bar,
            opts,
            xp=ctx.xp,
            block_rows=block_rows,
            target_grad=ctx.needs_input_grad[1],
        )
        w_bar = None
        if ctx.needs_input_grad[2]:
            w_bar = _math.row_losses_weight_vjp(x, target, weight, ce_bar, opts, xp=ctx.xp, block_rows=block_rows)
        return x_bar, t_bar, w_bar, None, None


class _RowLossesJvp(_RowLosses):
    """:class:`_RowLosses` with forward mode (eager only: dynamo refuses a Function with a ``jvp``)."""

    @staticmethod
    def jvp(ctx: Any, x_dot: Any, target_dot: Any, weight_dot: Any, *_: Any) -> Any:
        x, target, weight = ctx.saved_tensors
        opts = dataclasses.replace(ctx.opts, stop_gradient=torch.Tensor.detach)
        _, _, ce_dot, lse_dot = _math.row_losses_jvp(
            x, target, weight, x_dot, target_dot, opts, xp=ctx.xp, weight_dot=weight_dot
        )
        return ce_dot, lse_dot, None, None


def row_losses(x: Any, target: Any, weight: Any, opts: _math.Options, xp: Any) -> tuple[Any, Any]:
    function = _RowLosses if torch.compiler.is_compiling() else _RowLossesJvp
    ce, lse, _, _ = function.apply(x, target, weight, opts, xp)  # type: ignore[no-untyped-call]
    return ce, lse


# --------------------------------------------------------------------------
# linear_cross_entropy: "mean"/"sum" compute the gradients in the forward and
# scale them in the backward; "none" recomputes each chunk in the backward.


def _matmul_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` without an ``acc``-sized temporary (functional under compile)."""
    if torch.compiler.is_compiling():
        return torch.addmm(acc, a, b)
    return acc.addmm_(a, b)


def _linear_hooks() -> Any:
    from .. import _linear

    return _linear.Hooks(matmul_add=_matmul_add)


def _linear_spec(opts: _math.Options, chunk: int, w: torch.Tensor) -> Any:
    from .. import _linear

    # blocks of a chunk's (rows, V) logits, computed inside the Functions, where autograd records nothing
    block_rows, opts = blocking(w.T.detach(), opts)
    return _linear.Spec(opts, chunk, block_rows)


class _LinearScalar(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, h: Any, w: Any, b: Any, t: Any, weight: Any, ce_s: Any, lse_s: Any, spec: Any, xp: Any
    ) -> Any:
        from .. import _linear

        if not any(ctx.needs_input_grad[:3]):
            ce, lse = _linear.rows(h, w, b, t, weight, spec, xp=xp)
            return _linear.scalar_loss(ce, lse, ce_s, lse_s, xp)
        loss, grads = _linear.loss_and_grads(h, w, b, t, weight, ce_s, lse_s, spec, xp=xp, hooks=_linear_hooks())
        ctx.save_for_backward(*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3], strict=True)))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        # The saved gradients are scaled in place (eager): a second backward
        # through a retained graph then fails torch's saved-tensor version check.
        compiling = torch.compiler.is_compiling()
        if not compiling:
            if getattr(ctx, "scaled", False):
                raise RuntimeError(
                    "multixent: linear_cross_entropy's backward runs once per forward (it scales the gradients "
                    "computed in the forward in place); compute the loss again to differentiate it again"
                )
            ctx.scaled = True
        scaled = [
            None if s is None else (s * g).to(s.dtype) if compiling else s.mul_(g.to(s.dtype))
            for s in ctx.saved_tensors
        ]
        return (*scaled, None, None, None, None, None, None)


class _LinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Any, w: Any, b: Any, t: Any, weight: Any, spec: Any, xp: Any) -> Any:
        from .. import _linear

        ce, lse = _linear.rows(h, w, b, t, weight, spec, xp=xp)
        ctx.save_for_backward(h, w, b, t, weight)
        ctx.spec, ctx.xp = spec, xp
        return ce, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, ce_bar: torch.Tensor, lse_bar: torch.Tensor) -> Any:
        from .. import _linear

        h, w, b, t, weight = ctx.saved_tensors
        dh, dw, db = _linear.rows_vjp(h, w, b, t, weight, ce_bar, lse_bar, ctx.spec, xp=ctx.xp, hooks=_linear_hooks())
        return dh, dw, db, None, None, None, None


def linear_rows(h: Any, w: Any, b: Any, target: Any, weight: Any, opts: _math.Options, chunk: int, xp: Any) -> Any:
    return _LinearRows.apply(h, w, b, target, weight, _linear_spec(opts, chunk, w), xp)  # type: ignore[no-untyped-call]


def linear_scalar(
    h: Any,
    w: Any,
    b: Any,
    target: Any,
    weight: Any,
    ce_scale: Any,
    lse_scale: Any,
    opts: _math.Options,
    chunk: int,
    xp: Any,
) -> Any:
    spec = _linear_spec(opts, chunk, w)
    return _LinearScalar.apply(h, w, b, target, weight, ce_scale, lse_scale, spec, xp)  # type: ignore[no-untyped-call]
