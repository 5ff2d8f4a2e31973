"""Adapter for array libraries without autodiff (NumPy, array-api-strict, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat
import numpy

from .. import _linear, _math


def quiet() -> Any:
    """No floating-point warnings: NumPy's come from values the math masks
    (ignored rows holding inf/NaN, 0·log 0); results are as documented."""
    return numpy.errstate(all="ignore")


def as_array(a: Any) -> Any:
    """NumPy's scalars (what its reductions return) as 0-d arrays; anything else as it is."""
    return numpy.asarray(a) if isinstance(a, numpy.generic) else a


def concrete(a: Any) -> Any:
    return None if array_api_compat.is_lazy_array(a) else a


def blocking(x: Any, opts: _math.Options, *inputs: Any) -> tuple[int | None, _math.Options]:
    """Blocks of rows (one for lazy arrays, which dask chunks itself); in place for NumPy
    (``out=`` and integer-array setitem)."""
    in_place = array_api_compat.is_numpy_array(x)
    rows = None if array_api_compat.is_lazy_array(x) else _math.block_rows_for(x.shape[-1])
    return rows, dataclasses.replace(opts, in_place=in_place)


def row_losses(x: Any, target: Any, weight: Any, opts: _math.Options, xp: Any) -> tuple[Any, Any]:
    block_rows, opts = blocking(x, opts)
    return _math.row_losses(x, target, weight, opts, xp=xp, block_rows=block_rows)


# --------------------------------------------------------------------------
# linear_cross_entropy: values only (no autodiff here)


def linear_rows(h: Any, w: Any, b: Any, target: Any, weight: Any, opts: _math.Options, chunk: int, xp: Any) -> Any:
    block_rows, opts = blocking(w.T, opts)  # blocks of a chunk's logits, (rows, V) as w.T
    return _linear.rows(h, w, b, target, weight, _linear.Spec(opts, chunk, block_rows), xp=xp)


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
    ce, lse = linear_rows(h, w, b, target, weight, opts, chunk, xp)
    return _linear.scalar_loss(ce, lse, ce_scale, lse_scale, xp)


def linear_out_dtype(dtype: Any, hidden: Any) -> Any:
    """The loss's dtype: the inputs'."""
    return dtype
