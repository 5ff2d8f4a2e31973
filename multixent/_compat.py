"""array-api-compat's lookups, with torch tensors recognised directly.

array-api-compat caches its type checks with ``functools.lru_cache``, and
``torch.compile`` warns of every such call it traces (19 warnings on a
process's first compile of ``cross_entropy``). Torch tensors are recognised
here with a plain ``isinstance`` (against torch once it is imported; nothing
imports it); any other array goes to array-api-compat.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat


def is_torch_array(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_array_api_obj(x: Any) -> bool:
    return is_torch_array(x) or array_api_compat.is_array_api_obj(x)


def array_namespace(*xs: Any) -> Any:
    if xs and all(is_torch_array(x) for x in xs):
        import array_api_compat.torch as xp  # array_api_compat.array_namespace's answer

        return xp
    return array_api_compat.array_namespace(*xs)


def device(x: Any) -> Any:
    return x.device if is_torch_array(x) else array_api_compat.device(x)
