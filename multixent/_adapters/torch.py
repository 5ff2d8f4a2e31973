"""PyTorch adapter: the generic forward and closed-form backward as an autograd Function.

The forward saves only the logits (an input) and the per-row lse; the backward
writes the gradient block by block into one buffer. When the backward itself is
being differentiated (``create_graph=True``) it recomputes everything with
differentiable operations in one block, so double backward works. Under
``torch.compile`` everything is one block (the compiler fuses it) and the
eager index check is skipped (out-of-range indices give NaN).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _math


def concrete(a: Any) -> Any:
    return None if torch.compiler.is_compiling() else a


def _block_rows(x: torch.Tensor) -> int | None:
    return None if torch.compiler.is_compiling() else _math.block_rows_for(x.shape[-1])


class _RowLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, target: torch.Tensor, weight: Any, opts: Any, xp: Any) -> Any:
        ce, lse = _math.row_losses(x, target, weight, opts, xp=xp, block_rows=_block_rows(x))
        ctx.save_for_backward(x, target, weight, lse)
        ctx.opts, ctx.xp = opts, xp
        return ce, lse

    @staticmethod
    def backward(ctx: Any, ce_bar: torch.Tensor, lse_bar: torch.Tensor) -> Any:
        x, target, weight, lse = ctx.saved_tensors
        differentiable = torch.is_grad_enabled()
        x_bar, t_bar = _math.row_losses_vjp(
            x,
            target,
            weight,
            None if differentiable else lse,
            ce_bar,
            lse_bar,
            ctx.opts,
            xp=ctx.xp,
            block_rows=None if differentiable else _block_rows(x),
            target_grad=ctx.needs_input_grad[1],
        )
        return x_bar, t_bar, None, None, None


def row_losses(x: Any, target: Any, weight: Any, opts: _math.Options, xp: Any) -> tuple[Any, Any]:
    return _RowLosses.apply(x, target, weight, opts, xp)
