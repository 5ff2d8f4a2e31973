"""The frameworks' own losses, as oracles: the only test file that names frameworks' loss functions.

torch: ``F.cross_entropy`` and ``F.nll_loss`` support every option; ``softcap``
and ``z_loss`` (which torch does not have) are written around them with torch
operations. optax: ``softmax_cross_entropy_with_integer_labels`` and
``softmax_cross_entropy`` have no class weights, ``ignore_index`` or label
smoothing, so :data:`jax_loss` answers None for those options (tests then
compare with the float64 reference of :mod:`_reference`).

Each native object has ``cross_entropy(x, t, **options)`` (the options of :class:`_reference.Options`),
``nll_loss(log_probs, t, **options)``, ``log_softmax(x, axis)`` and
``logsumexp(x, axis, keepdims)`` taking and returning the framework's arrays;
a method answers None when the framework has no such loss for those options.
Semantics are the framework's own: e.g. torch's "mean" over zero counted
targets is NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _reference import Options


def _reduce(per: Any, counted: Any, reduction: str) -> Any:
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / counted.sum()


class _Torch:
    name = "torch"

    @staticmethod
    def cross_entropy(x: Any, t: Any, **options: Any) -> Any:
        import torch
        import torch.nn.functional as F

        o = Options(**options)
        axis, ignore_index, reduction, z_loss, softcap = o.axis, o.ignore_index, o.reduction, o.z_loss, o.softcap
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        is_index = not t.is_floating_point()
        class_dim = 0
        if x.ndim > 1:  # torch's layout: classes on dimension 1
            x = torch.movedim(x, axis, 1)
            class_dim = 1
            if not is_index:
                t = torch.movedim(t, axis, 1)
        kwargs: dict[str, Any] = {"weight": o.weight, "reduction": reduction, "label_smoothing": o.label_smoothing}
        if is_index:
            kwargs["ignore_index"] = ignore_index
        loss = F.cross_entropy(x, t, **kwargs)
        if z_loss:
            lse = torch.logsumexp(x, dim=class_dim)
            counted = t != ignore_index if is_index else torch.ones_like(lse, dtype=torch.bool)
            lse2 = torch.where(counted, lse, torch.zeros_like(lse)) ** 2
            loss = loss + z_loss * _reduce(lse2, counted, reduction)
        return loss

    @staticmethod
    def nll_loss(
        log_probs: Any, t: Any, *, axis: int = -1, weight: Any = None, ignore_index: int = -100, reduction: str = "mean"
    ) -> Any:
        import torch
        import torch.nn.functional as F

        if log_probs.ndim > 1:
            log_probs = torch.movedim(log_probs, axis, 1)
        return F.nll_loss(log_probs, t, weight=weight, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def log_softmax(x: Any, axis: int = -1) -> Any:
        import torch

        return torch.log_softmax(x, dim=axis)

    @staticmethod
    def logsumexp(x: Any, axis: int = -1, keepdims: bool = False) -> Any:
        import torch

        return torch.logsumexp(x, dim=axis, keepdim=keepdims)


class _Jax:
    name = "jax"

    @staticmethod
    def cross_entropy(x: Any, t: Any, **options: Any) -> Any:
        import jax
        import jax.numpy as jnp
        import optax

        o = Options(**options)
        axis, softcap, z_loss = o.axis, o.softcap, o.z_loss
        is_index = jnp.issubdtype(t.dtype, jnp.integer)
        if o.weight is not None or o.label_smoothing:
            return None  # optax has neither
        if is_index and bool(np.any(np.asarray(t) == o.ignore_index)):
            return None  # nor ignore_index
        if softcap is not None:
            x = softcap * jnp.tanh(x / softcap)
        if is_index:
            per = optax.softmax_cross_entropy_with_integer_labels(x, t, axis=axis)
        else:
            per = optax.softmax_cross_entropy(x, t, axis=axis)
        if z_loss:
            per = per + z_loss * jax.nn.logsumexp(x, axis=axis) ** 2
        if o.reduction == "none":
            return per
        return jnp.sum(per) if o.reduction == "sum" else jnp.mean(per)

    @staticmethod
    def nll_loss(log_probs: Any, t: Any, **options: Any) -> Any:
        return None  # optax has no nll loss

    @staticmethod
    def log_softmax(x: Any, axis: int = -1) -> Any:
        import jax

        return jax.nn.log_softmax(x, axis=axis)

    @staticmethod
    def logsumexp(x: Any, axis: int = -1, keepdims: bool = False) -> Any:
        import jax

        return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)


torch_loss = _Torch()
jax_loss = _Jax()
