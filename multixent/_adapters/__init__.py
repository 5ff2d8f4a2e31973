"""Pick the adapter for an array: the one place that tells frameworks apart.

An adapter supplies ``row_losses(x, target, weight, opts, xp)`` (the per-row
``(ce, lse)`` of :func:`multixent._math.row_losses`, differentiable through
the framework's autodiff), ``blocking(x, opts, *inputs)`` (rows per block and the
options for computing without autodiff), ``concrete(array)`` (the array,
or a host copy of it, when its values can be read now; None while traced) and
``quiet()`` (a context without floating-point warnings).
Framework modules are imported only when such an array arrives:
array-api-compat recognises torch and JAX arrays without importing them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat

from . import generic


def adapter_for(x: Any) -> ModuleType:
    if array_api_compat.is_torch_array(x):
        from . import torch

        return torch
    if array_api_compat.is_jax_array(x):
        from . import jax

        return jax
    return generic
