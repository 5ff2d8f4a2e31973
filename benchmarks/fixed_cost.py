"""The per-call cost of small problems, multixent / native in the same run (issue 12).

``python benchmarks/fixed_cost.py [threads] [wall|process] [NxC,...]``: best of 5 rounds of 300 calls (rounds
of the losses alternate), at 64x10 and 512x100 (or the sizes given), float32: torch eager forward under ``no_grad``
and forward+backward against ``F.cross_entropy``; NumPy's forward against SciPy's
``log_softmax`` + ``take_along_axis``, ``cross_entropy_and_grad`` against SciPy's ``softmax``
minus the one-hot target, divided by N; JAX without ``jit`` against optax's eager call.
A quick check for a busy machine; the recorded figures come from asv (``nox -s bench``).

The ``floor`` column is the same formula in the fewest operations of the same library, with no
validation, options or Python around them (max, ``exp(x - m)``, sum, log, the target's gather,
mean; ``exp(x - m)`` over ``x - m`` and the closed-form gradient over it; torch's exponential is multixent's
``_compat.exp``, which takes large float32 tensors through ``exp2``): what any loss computed operation by
operation pays, where the native loss runs one or two fused kernels.

The ``kernel`` column (torch only) is the other way to build it: torch's fused ``log_softmax`` kernel as
the primitive, and the target's entry of it (autograd's ``log_softmax`` backward for the gradient), with
the per-row max that keeps multixent's results for rows holding ``+inf`` or only ``-inf`` (where
``log_softmax`` gives NaN). It answers whether taking torch's kernels as primitives would meet the
bars where the operations cannot.
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
from multixent._compat import exp

SHAPES = ((64, 10), (512, 100))


#: ``process``: the process's CPU time (``time.process_time``), steadier than the wall clock on a
#: machine shared with other work (with 1 torch thread it is the call's own work).
CLOCK = {"wall": time.perf_counter, "process": time.process_time}
_clock = "wall"


def best(*fs: Callable[[], Any], calls: int = 300, rounds: int = 5) -> tuple[float, ...]:
    """Best-of-``rounds`` microseconds per call of each of ``fs``, alternating rounds."""
    for f in fs:
        f()
    times: list[list[float]] = [[] for _ in fs]
    for _ in range(rounds):
        for f, t in zip(fs, times, strict=True):
            t.append(timeit.Timer(f, timer=CLOCK[_clock]).timeit(calls) / calls * 1e6)
    return tuple(min(t) for t in times)


def _torch_floor() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """The fewest-operation forward and recorded forward (gradient in the forward, as multixent's), and
    the kernel route (autograd records it: its backward is torch's ``log_softmax`` backward)."""
    import torch

    def kernel(x: Any, y: Any) -> Any:
        m = x.detach().amax(-1)  # rows whose max is not finite: lse - x_y from m (multixent's results)
        x_y = x.gather(1, y[:, None])[:, 0]
        ce = -torch.log_softmax(x, -1).gather(1, y[:, None])[:, 0]
        return torch.where(m.isfinite(), ce, m - x_y).mean()

    def forward(x: Any, y: Any) -> Any:
        m = x.amax(-1, keepdim=True)
        e = x - m
        return (torch.log(exp(e, torch, out=e).sum(-1)) - (x.gather(1, y[:, None])[:, 0] - m[:, 0])).mean()

    class Recorded(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, y: Any) -> Any:
            m = x.amax(-1, keepdim=True)
            e = x - m
            e = exp(e, torch, out=e)
            s = e.sum(-1)
            loss = (torch.log(s) - (x.gather(1, y[:, None])[:, 0] - m[:, 0])).mean()
            e *= (1.0 / (s * x.shape[0]))[:, None]
            e[torch.arange(x.shape[0]), y] -= 1.0 / x.shape[0]
            ctx.save_for_backward(e)
            return loss

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return ctx.saved_tensors[0] * g, None

    return forward, Recorded.apply, kernel


def _numpy_floor(x: Any, y: Any) -> Any:
    m = x.max(-1, keepdims=True)
    return (np.log(np.exp(x - m).sum(-1)) - (np.take_along_axis(x, y[:, None], -1)[:, 0] - m[:, 0])).mean()


def _numpy_floor_grad(x: Any, y: Any) -> Any:
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(-1)
    loss = (np.log(s) - (np.take_along_axis(x, y[:, None], -1)[:, 0] - m[:, 0])).mean()
    e *= (1.0 / (s * x.shape[0]))[:, None]
    e[np.arange(x.shape[0]), y] -= 1.0 / x.shape[0]
    return loss, e


def rows(threads: int, shapes: tuple[tuple[int, int], ...] = SHAPES) -> list[tuple[Any, ...]]:
    import torch

    torch.set_num_threads(threads)
    return [row for n, c in shapes for row in _size(n, c)]


def _size(n: int, c: int) -> list[tuple[Any, ...]]:
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

    torch_floor, torch_floor_recorded, kernel = _torch_floor()

    def jax_floor() -> Any:
        m = jx.max(-1, keepdims=True)
        lse = jax.numpy.log(jax.numpy.exp(jx - m).sum(-1))
        return (lse - (jax.numpy.take_along_axis(jx, jy[:, None], -1)[:, 0] - m[:, 0])).mean().block_until_ready()

    def mx_jax() -> Any:
        return mx.cross_entropy(jx, jy).block_until_ready()

    def optax_jax() -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(jx, jy).mean().block_until_ready()

    return [
        (
            "torch fwd no_grad",
            size,
            *best(fwd(mx.cross_entropy), fwd(F.cross_entropy), fwd(torch_floor), fwd(kernel)),
        ),
        (
            "torch fwd+bwd",
            size,
            *best(fwd_bwd(mx.cross_entropy), fwd_bwd(F.cross_entropy), fwd_bwd(torch_floor_recorded), fwd_bwd(kernel)),
        ),
        ("NumPy forward", size, *best(lambda: mx.cross_entropy(x, y), scipy_fwd, lambda: _numpy_floor(x, y)), None),
        (
            "NumPy and_grad",
            size,
            *best(lambda: mx.cross_entropy_and_grad(x, y), scipy_grad, lambda: _numpy_floor_grad(x, y)),
            None,
        ),
        ("JAX eager", size, *best(mx_jax, optax_jax, jax_floor), None),
    ]


if __name__ == "__main__":
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    _clock = sys.argv[2] if len(sys.argv) > 2 else "wall"
    shapes = tuple(tuple(map(int, s.split("x"))) for s in sys.argv[3].split(",")) if len(sys.argv) > 3 else SHAPES
    print(f"torch threads {threads}; best of 5 x 300 calls, us per call ({_clock} clock)")
    heads = ("multixent", "native", "floor", "ratio", "floor ratio", "kernel ratio")
    print(f"{'case':20} {'size':9}", *(f"{h:>{w}}" for h, w in zip(heads, (10, 10, 10, 6, 11, 12), strict=True)))
    for case, size, a, b, f, k in rows(threads, shapes):
        kernel = "" if k is None else f"{k / b:12.2f}"
        print(f"{case:20} {size:9} {a:10.1f} {b:10.1f} {f:10.1f} {a / b:6.2f} {f / b:11.2f} {kernel}")
