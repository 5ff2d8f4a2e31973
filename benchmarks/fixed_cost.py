"""The per-call cost of small problems, multixent / native in the same run (issue 12).

``python benchmarks/fixed_cost.py [threads] [wall|process]``: best of 5 rounds of 300 calls (rounds of the
two losses alternate), at 64x10 and 512x100, float32: torch eager forward under ``no_grad``
and forward+backward against ``F.cross_entropy``; NumPy's forward against SciPy's
``log_softmax`` + ``take_along_axis``, ``cross_entropy_and_grad`` against SciPy's ``softmax``
minus the one-hot target, divided by N; JAX without ``jit`` against optax's eager call.
A quick check for a busy machine; the recorded figures come from asv (``nox -s bench``).
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.special

import multixent as mx

SHAPES = ((64, 10), (512, 100))


#: ``process``: the process's CPU time (``time.process_time``), steadier than the wall clock on a
#: machine shared with other work (with 1 torch thread it is the call's own work).
CLOCK = {"wall": time.perf_counter, "process": time.process_time}
_clock = "wall"


def best(f: Callable[[], Any], g: Callable[[], Any], calls: int = 300, rounds: int = 5) -> tuple[float, float]:
    """Best-of-``rounds`` microseconds per call of ``f`` and ``g``, alternating rounds."""
    f(), g()
    tf, tg = [], []
    for _ in range(rounds):
        tf.append(timeit.Timer(f, timer=CLOCK[_clock]).timeit(calls) / calls * 1e6)
        tg.append(timeit.Timer(g, timer=CLOCK[_clock]).timeit(calls) / calls * 1e6)
    return min(tf), min(tg)


def rows(threads: int) -> list[tuple[str, str, float, float]]:
    import torch

    torch.set_num_threads(threads)
    return [row for n, c in SHAPES for row in _size(n, c)]


def _size(n: int, c: int) -> list[tuple[str, str, float, float]]:
    import jax
    import optax
    import torch
    import torch.nn.functional as F

    size = f"{n}x{c}"
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, c), dtype=np.float32) * 2, rng.integers(0, c, n)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    xg = tx.clone().requires_grad_()
    jx, jy = jax.numpy.asarray(x), jax.numpy.asarray(y)

    def fwd(f: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return f(tx, ty)

        return call

    def fwd_bwd(f: Any) -> Callable[[], Any]:
        def call() -> None:
            xg.grad = None
            f(xg, ty).backward()

        return call

    def scipy_fwd() -> Any:
        return -np.take_along_axis(scipy.special.log_softmax(x, axis=-1), y[:, None], axis=-1).mean()

    def scipy_grad() -> Any:
        g = scipy.special.softmax(x, axis=-1)
        g[np.arange(n), y] -= 1.0
        return g / n

    def mx_jax() -> Any:
        return mx.cross_entropy(jx, jy).block_until_ready()

    def optax_jax() -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(jx, jy).mean().block_until_ready()

    return [
        ("torch fwd no_grad", size, *best(fwd(mx.cross_entropy), fwd(F.cross_entropy))),
        ("torch fwd+bwd", size, *best(fwd_bwd(mx.cross_entropy), fwd_bwd(F.cross_entropy))),
        ("NumPy forward", size, *best(lambda: mx.cross_entropy(x, y), scipy_fwd)),
        ("NumPy and_grad", size, *best(lambda: mx.cross_entropy_and_grad(x, y), scipy_grad)),
        ("JAX eager", size, *best(mx_jax, optax_jax)),
    ]


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    _clock = sys.argv[2] if len(sys.argv) > 2 else "wall"
    print(f"torch threads {threads}; best of 5 x 300 calls, us per call ({_clock} clock)")
    print(f"{'case':20} {'size':8} {'multixent':>10} {'native':>10} {'ratio':>6}")
    for case, size, a, b in rows(threads):
        print(f"{case:20} {size:8} {a:10.1f} {b:10.1f} {a / b:6.2f}")
