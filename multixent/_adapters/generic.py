"""Adapter for array libraries without autodiff (NumPy, array-api-strict, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any

import array_api_compat

from .. import _math


def concrete(a: Any) -> Any:
    return None if array_api_compat.is_lazy_array(a) else a


def blocking(x: Any, opts: _math.Options) -> tuple[int | None, _math.Options]:
    """Cache-sized blocks of rows; in-place scatter where integer-array setitem exists."""
    scatter = array_api_compat.is_numpy_array(x)
    return _math.block_rows_for(x.shape[-1]), dataclasses.replace(opts, scatter=scatter)


def row_losses(x: Any, target: Any, weight: Any, opts: _math.Options, xp: Any) -> tuple[Any, Any]:
    block_rows, opts = blocking(x, opts)
    return _math.row_losses(x, target, weight, opts, xp=xp, block_rows=block_rows)
