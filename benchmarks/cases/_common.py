"""The grid and the inputs shared by the cases (no measurement here: asv times and samples).

``MULTIXENT_BENCH_GRID=tiny`` swaps every size for a small one, to check the whole pipeline
(``asv run`` -> JSON -> ``report.py``) in a minute; the report marks such a run.

Inputs are created in place (``empty`` + ``normal_``), never through a temporary: asv's
``peakmem_*`` is the process's peak RSS, and the setup's own peak must be the inputs alone for
``peakmem_<case> - peakmem_baseline`` to be the case's extra memory.
"""

from __future__ import annotations

import os
from typing import Any

GRID = os.environ.get("MULTIXENT_BENCH_GRID", "full")
TINY = GRID == "tiny"
#: ``MULTIXENT_BENCH_GRID=accept``: the acceptance points only (the fixed per-call cost at 64x10,
#: float32; the large point; linear at V=32768), with `-a repeat=5` about 15 minutes.
ACCEPT_ONLY = GRID == "accept"

#: (N, C) points of the cross-entropy grid; 64x10 is the fixed per-call cost, 2048x50257 GPT-2's vocabulary.
SHAPES_FULL = (
    "64x10",
    "512x100",
    "512x1000",
    "512x8000",
    "512x32000",
    "512x131072",
    "4096x100",
    "4096x1000",
    "4096x8000",
    "4096x32000",
    "2048x50257",
)
SHAPES_TINY = ("64x10", "256x1000")
SHAPES_ACCEPT = ("64x10", "4096x32000")
SHAPES = SHAPES_TINY if TINY else SHAPES_ACCEPT if ACCEPT_ONLY else SHAPES_FULL
#: The acceptance point (issue 3; issue 12's per-option memory): N=4096, C=32000, float32.
ACCEPT = "256x1000" if TINY else "4096x32000"
DTYPES = ("float32",) if ACCEPT_ONLY else ("float32", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2}
#: Peak RSS is measured only where the bfloat16 logits take at least 4 MiB (RSS noise dominates below).
MEMORY_SHAPES = SHAPES if TINY else tuple(s for s in SHAPES if int(s.split("x")[0]) * int(s.split("x")[1]) * 2 >= 2**22)
#: The points whose logits hold at most 2**22 elements (native calls below ~5 ms), where a ratio of two
#: processes is least steady: the ``*Ratio`` benchmarks of ``cross_entropy`` time both in one process there.
RATIO_SHAPES = tuple(s for s in SHAPES if int(s.split("x")[0]) * int(s.split("x")[1]) <= 2**22)
#: torch.compile is measured at these points (fp32; compiling takes 5-20 s per graph).
COMPILE_SHAPES = (
    ("256x1000",) if TINY else ("4096x32000",) if ACCEPT_ONLY else ("4096x100", "4096x1000", "4096x8000", "4096x32000")
)

#: linear_cross_entropy: N rows, D features, V classes (fp32); V=131072's naive path is not run.
LINEAR_N, LINEAR_D = (512, 64) if TINY else (8192, 512)
LINEAR_V = (2048,) if TINY else (32768,) if ACCEPT_ONLY else (8192, 32768, 131072)
LINEAR_ACCEPT_V = 2048 if TINY else 32768
LINEAR_NAIVE_MAX_V = 32768

THREADS = 2


def shape(s: str) -> tuple[int, int]:
    n, c = s.split("x")
    return int(n), int(c)


def logits_bytes(s: str, dtype: str = "float32") -> int:
    n, c = shape(s)
    return n * c * ITEMSIZE[dtype]


def skip(reason: str) -> None:
    """Skip this parameter combination (asv records it as skipped, not failed)."""
    raise NotImplementedError(reason)


def torch_inputs(n: int, c: int, dtype: str = "float32") -> tuple[Any, Any]:
    import torch

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    x = torch.empty(n, c, dtype=getattr(torch, dtype)).normal_(0.0, 2.0, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def numpy_inputs(n: int, c: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = np.empty((n, c), np.float32)
    rng.standard_normal(out=x, dtype=np.float32)
    x *= 2.0
    return x, rng.integers(0, c, n)


def jax_inputs(n: int, c: int, dtype: str = "float32") -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    kx, ky = jax.random.split(jax.random.key(0))
    x = (2.0 * jax.random.normal(kx, (n, c), jnp.float32)).astype(getattr(jnp, dtype))
    y = jax.random.randint(ky, (n,), 0, c, dtype=jnp.int32)
    return jax.block_until_ready(x), jax.block_until_ready(y)


def xla_extra_bytes(fn: Any, *args: Any) -> int:
    """``memory_analysis()`` of ``jax.jit(fn)``: temp + output bytes, the memory beyond the arguments."""
    import jax

    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
