"""The per-call cost of small problems, multixent / native in the same run (issue 12).

``python benchmarks/fixed_cost.py [threads]``: best of 5 rounds of 300 calls (rounds of the
two losses alternate), at 64x10 and 512x100, float32: torch eager forward under ``no_grad``
and forward+backward against ``F.cross_entropy``; NumPy's forward against SciPy's
``log_softmax`` + ``take_along_axis``, ``cross_entropy_and_grad`` against SciPy's ``softmax``
minus the one-hot target, divided by N; JAX without ``jit`` against optax's eager call.
A quick check for a busy machine; the recorded figures come from asv (``nox -s bench``).
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.special

import multixent as mx

SHAPES = ((64, 10), (512, 100))


def best(f: Callable[[], Any], g: Callable[[], Any], calls: int = 300, rounds: int = 5) -> tuple[float, float]:
    """Best-of-``rounds`` microseconds per call of ``f`` and ``g``, alternating rounds."""
    f(), g()
    tf, tg = [], []
    for _ in range(rounds):
        tf.append(timeit.timeit(f, number=calls) / calls * 1e6)
        tg.append(timeit.timeit(g, number=calls) / calls * 1e6)
    return min(tf), min(tg)


def rows(threads: int) -> list[tuple[str, str, float, float]]:
    import jax
    import optax
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = []
    for n, c in SHAPES:
        size = f"{n}x{c}"
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((n, c), dtype=np.float32) * 2, rng.integers(0, c, n)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def fwd(f: Any) -> Callable[[], Any]:
            def call() -> Any:
                with torch.no_grad():
                    return f(tx, ty)

            return call

        out.append(("torch fwd no_grad", size, *best(fwd(mx.cross_entropy), fwd(F.cross_entropy))))
        xg = tx.clone().requires_grad_()

        def fwd_bwd(f: Any) -> Callable[[], Any]:
            def call() -> None:
                xg.grad = None
                f(xg, ty).backward()

            return call

        out.append(("torch fwd+bwd", size, *best(fwd_bwd(mx.cross_entropy), fwd_bwd(F.cross_entropy))))

        def scipy_fwd() -> Any:
            return -np.take_along_axis(scipy.special.log_softmax(x, axis=-1), y[:, None], axis=-1).mean()

        def scipy_grad() -> Any:
            g = scipy.special.softmax(x, axis=-1)
            g[np.arange(n), y] -= 1.0
            return g / n

        out.append(("NumPy forward", size, *best(lambda: mx.cross_entropy(x, y), scipy_fwd)))
        out.append(("NumPy and_grad", size, *best(lambda: mx.cross_entropy_and_grad(x, y), scipy_grad)))
        jx, jy = jax.numpy.asarray(x), jax.numpy.asarray(y)

        def mx_jax() -> Any:
            return mx.cross_entropy(jx, jy).block_until_ready()

        def optax_jax() -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(jx, jy).mean().block_until_ready()

        out.append(("JAX eager", size, *best(mx_jax, optax_jax)))
    return out


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"torch threads {threads}; best of 5 x 300 calls, us per call")
    print(f"{'case':20} {'size':8} {'multixent':>10} {'native':>10} {'ratio':>6}")
    for case, size, a, b in rows(threads):
        print(f"{case:20} {size:8} {a:10.1f} {b:10.1f} {a / b:6.2f}")
