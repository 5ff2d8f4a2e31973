"""multixent.cross_entropy (class-index targets, mean reduction) against each framework's native loss.

Every class is parameterised by ``impl``: multixent and the native loss run as parameters of the
same benchmark, in the same ``asv run``, and ``report.py`` divides the two.

* torch eager: ``F.cross_entropy``; forward under ``torch.no_grad()`` and forward+backward;
* torch.compile: both compiled (``dynamic=False``) and warmed up in ``setup``;
* ``jax.jit``: ``optax.softmax_cross_entropy_with_integer_labels(x, y).mean()``, forward and
  ``jax.value_and_grad``; memory from XLA's ``memory_analysis()`` (``track_*``);
* NumPy (fp32): SciPy's ``log_softmax`` + ``take_along_axis``; ``cross_entropy_and_grad`` against
  the gradient a NumPy user writes by hand, ``(softmax(x) - onehot(y)) / N`` (SciPy's ``softmax``).

``TorchEagerRatio``, ``JaxJitRatio`` and ``NumPyRatio`` time both losses in one process instead, at the
points below ~2 ms, where the ratio of two asv processes is least steady; the torch and NumPy ones also time
the *floor* and torch's *kernel* route against the native loss (``impl``, see the floors below).

Memory of torch and NumPy is asv's ``peakmem_*`` (peak RSS of one fresh process per figure):
``peakmem_baseline`` runs the same ``setup`` (imports, a small warm-up call, the inputs) and nothing
else, and ``report.py`` takes ``peakmem_<pass> - peakmem_baseline`` as the extra memory.
"""

from __future__ import annotations

import functools
from typing import Any

from ._common import (
    COMPILE_SHAPES,
    DTYPES,
    MEMORY_SHAPES,
    RATIO_SHAPES,
    SHAPES,
    jax_inputs,
    logits_bytes,
    numpy_inputs,
    shape,
    torch_inputs,
    xla_extra_bytes,
)

# --------------------------------------------------------------------------------------------
# The losses compared


def torch_loss(impl: str) -> Any:
    if impl == "multixent":
        import multixent

        return multixent.cross_entropy
    import torch.nn.functional as F

    return F.cross_entropy


def jax_loss(impl: str) -> Any:
    if impl == "multixent":
        import multixent

        return lambda x, y: multixent.cross_entropy(x, y)
    import optax

    return lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def scipy_cross_entropy(x: Any, y: Any) -> Any:
    """The native NumPy forward: ``-mean(take_along_axis(log_softmax(x), y))``."""
    import numpy as np
    from scipy.special import log_softmax

    return -np.take_along_axis(log_softmax(x, axis=-1), y[:, None], axis=-1).mean()


def numpy_loss_and_grad(x: Any, y: Any) -> Any:
    """The gradient a NumPy user writes: ``(softmax(x) - onehot(y)) / N``, with the loss from it."""
    import numpy as np
    from scipy.special import softmax

    n = x.shape[0]
    p = softmax(x, axis=-1)
    rows = np.arange(n)
    loss = -np.log(p[rows, y]).mean()
    p[rows, y] -= 1.0
    p /= n
    return loss, p


def numpy_fn(impl: str) -> Any:
    import scipy.special  # noqa: F401  (imported here, in setup, not in the first timed call)

    import multixent

    return {
        "multixent": multixent.cross_entropy,
        "scipy": scipy_cross_entropy,
        "multixent_and_grad": multixent.cross_entropy_and_grad,
        "numpy_grad": numpy_loss_and_grad,
        "floor": lambda x, y: numpy_floor(x, y)[0],
        "floor_and_grad": numpy_floor_and_grad,
    }[impl]


# --------------------------------------------------------------------------------------------
# The floors: the same formula in the fewest operations of the same library, with no validation, options
# or Python around them (max, ``exp(x - m)`` over ``x - m``, sum, log, the target's gather, mean; the
# gradient written over ``exp(x - m)``): what any loss computed operation by operation pays, where the
# native loss runs one or two fused kernels. Timed by the ``*Ratio`` benchmarks only (``impl="floor"``).

LOG2E = 1.4426950408889634


def numpy_floor(x: Any, y: Any) -> tuple[Any, Any, Any]:
    """The NumPy floor's forward: ``(loss, exp(x - m), its row sums)``."""
    import numpy as np

    m = x.max(-1, keepdims=True)
    e = x - m
    np.exp(e, out=e)
    s = e.sum(-1)
    return (np.log(s) - (np.take_along_axis(x, y[:, None], -1)[:, 0] - m[:, 0])).mean(), e, s


def numpy_floor_and_grad(x: Any, y: Any) -> tuple[Any, Any]:
    """The NumPy floor of ``cross_entropy_and_grad``: the gradient ``(softmax - onehot) / N`` over ``exp(x - m)``."""
    import numpy as np

    loss, e, s = numpy_floor(x, y)
    n = x.shape[0]
    e *= (1.0 / (s * n))[:, None]
    e[np.arange(n), y] -= 1.0 / n
    return loss, e


def torch_floor(x: Any, y: Any) -> tuple[Any, Any, Any]:
    """The torch floor's forward, ``(loss, exp(x - m), its row sums)``; the exponential as ``exp2`` of the
    product by ``log2 e``, in place (the passes multixent's torch forward makes)."""
    m = x.amax(-1, keepdim=True)
    e = (x - m).mul_(LOG2E).exp2_()
    s = e.sum(-1)
    return (s.log() - (x.gather(1, y[:, None])[:, 0] - m[:, 0])).mean(), e, s


@functools.cache
def torch_floor_recorded() -> Any:
    """The torch floor that autograd records: the gradient formed in the forward (as multixent's), kept for
    the backward."""
    import torch

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, y: Any) -> Any:
            loss, e, s = torch_floor(x, y)
            n = x.shape[0]
            e *= (1.0 / (s * n))[:, None]
            e[torch.arange(n), y] -= 1.0 / n
            ctx.save_for_backward(e)
            return loss

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return ctx.saved_tensors[0] * g, None

    return Floor.apply


def torch_kernel(x: Any, y: Any) -> Any:
    """The *kernel* route: torch's fused ``log_softmax`` as the primitive and the target's entry of it (autograd's
    ``log_softmax`` backward for the gradient), with the per-row max that keeps multixent's results for rows
    holding ``+inf`` or only ``-inf`` (where ``log_softmax`` gives NaN)."""
    import torch

    m = x.detach().amax(-1)
    x_y = x.gather(1, y[:, None])[:, 0]
    ce = -torch.log_softmax(x, -1).gather(1, y[:, None])[:, 0]
    return torch.where(m.isfinite(), ce, m - x_y).mean()


def torch_ratio_losses(impl: str) -> tuple[Any, Any]:
    """``(forward, forward+backward)`` of ``impl``: multixent, its floor or the kernel route."""
    if impl == "floor":
        return (lambda x, y: torch_floor(x, y)[0]), torch_floor_recorded()
    f = torch_kernel if impl == "kernel" else torch_loss("multixent")
    return f, f


def _warmup_rows(n: int, c: int) -> int:
    """Rows of the small warm-up call in a memory setup: ~2**18 elements, at most n/16 rows."""
    return max(1, min(n // 16, 2**18 // c))


# --------------------------------------------------------------------------------------------
# torch eager


class TorchEager:
    """torch eager time: forward (``no_grad``) and forward+backward (``.grad`` reset each call)."""

    params = (list(SHAPES), list(DTYPES), ["multixent", "native"])
    param_names = ("shape", "dtype", "impl")

    def setup(self, s: str, dtype: str, impl: str) -> None:
        import torch

        self.no_grad = torch.no_grad
        self.f = torch_loss(impl)
        self.x, self.y = torch_inputs(*shape(s), dtype)
        self.xr = self.x.clone().requires_grad_(True)
        self.time_fwd(s, dtype, impl)  # lazy imports and first-call work, not timed
        self.time_fwd_bwd(s, dtype, impl)

    def time_fwd(self, s: str, dtype: str, impl: str) -> None:
        with self.no_grad():
            self.f(self.x, self.y)

    def time_fwd_bwd(self, s: str, dtype: str, impl: str) -> None:
        self.xr.grad = None
        self.f(self.xr, self.y).backward()


def alternating_best(*fs: Any, rounds: int = 7, budget: float = 0.05) -> list[float]:
    """Seconds per call of each of ``fs``, all in this process: each warmed up (20 calls), then the best of
    ``rounds`` rounds of about ``budget`` seconds each, the functions' rounds alternating, in reverse order
    every other round (a function timed right after another pays no fixed share of its aftermath)."""
    import timeit

    for f in fs:
        timeit.timeit(f, number=20)
    numbers = [max(1, int(budget / max(timeit.timeit(f, number=10) / 10, 1e-7))) for f in fs]
    times: list[list[float]] = [[] for _ in fs]
    runs = list(zip(fs, numbers, times, strict=True))
    for i in range(rounds):
        for f, n, t in runs if i % 2 == 0 else runs[::-1]:
            t.append(timeit.timeit(f, number=n) / n)
    return [min(t) for t in times]


class TorchEagerRatio:
    """torch eager ``impl`` / ``F.cross_entropy`` timed in one process (:func:`alternating_best`). asv's time
    benchmarks put each implementation in its own process, and on a shared VM one process can run 1.5x
    slower than the next: a ratio of two processes carries that; a ratio within one does not. ``impl``:
    multixent, the floor (:func:`torch_floor`) or the kernel route (:func:`torch_kernel`)."""

    params = (list(RATIO_SHAPES), list(DTYPES), ["multixent", "floor", "kernel"])
    param_names = ("shape", "dtype", "impl")
    unit = "impl / native"
    processes = 1  # each value is already a comparison within one process

    def setup(self, s: str, dtype: str, impl: str) -> None:
        self.x, self.y = torch_inputs(*shape(s), dtype)
        self.xr = self.x.clone().requires_grad_(True)
        self.losses = torch_ratio_losses(impl)
        self.native = torch_loss("native")

    def track_fwd(self, s: str, dtype: str, impl: str) -> float:
        import torch

        def call(f: Any) -> Any:
            def run() -> None:
                with torch.no_grad():
                    f(self.x, self.y)

            return run

        mine, native = alternating_best(call(self.losses[0]), call(self.native))
        return mine / native

    def track_fwd_bwd(self, s: str, dtype: str, impl: str) -> float:
        def call(f: Any) -> Any:
            def run() -> None:
                self.xr.grad = None
                f(self.xr, self.y).backward()

            return run

        mine, native = alternating_best(call(self.losses[1]), call(self.native))
        return mine / native


class TorchEagerMemory:
    """torch eager peak RSS; extra = ``peakmem_<pass> - peakmem_baseline`` (``.grad`` included)."""

    params = (list(MEMORY_SHAPES), list(DTYPES), ["multixent", "native"])
    param_names = ("shape", "dtype", "impl")
    processes = 1  # asv keeps one value per peakmem, the last process's

    def setup(self, s: str, dtype: str, impl: str) -> None:
        import torch

        self.no_grad = torch.no_grad
        self.f = torch_loss(impl)
        n, c = shape(s)
        w, wy = torch_inputs(_warmup_rows(n, c), c, dtype)  # library initialisation, not counted
        w.requires_grad_(True)
        self.f(w, wy).backward()
        del w, wy
        self.x, self.y = torch_inputs(n, c, dtype)
        self.x.requires_grad_(True)

    def peakmem_baseline(self, s: str, dtype: str, impl: str) -> None:
        pass

    def peakmem_fwd(self, s: str, dtype: str, impl: str) -> None:
        with self.no_grad():
            self.f(self.x, self.y)

    def peakmem_fwd_bwd(self, s: str, dtype: str, impl: str) -> None:
        self.f(self.x, self.y).backward()


# --------------------------------------------------------------------------------------------
# torch.compile


class _TorchCompile:
    passes = "fwd"
    params = (list(COMPILE_SHAPES), ["multixent", "native"])
    param_names = ("shape", "impl")
    timeout = 900

    def setup(self, s: str, impl: str) -> None:
        import warnings

        import torch

        warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")
        self.no_grad = torch.no_grad
        self.x, self.y = torch_inputs(*shape(s))
        self.f = torch.compile(torch_loss(impl), dynamic=False)
        if self.passes == "fwd_bwd":
            self.x.requires_grad_(True)
        self.time_call(s, impl)  # compile and warm up

    def time_call(self, s: str, impl: str) -> None:
        if self.passes == "fwd":
            with self.no_grad():
                self.f(self.x, self.y)
        else:
            self.x.grad = None
            self.f(self.x, self.y).backward()


class TorchCompileFwd(_TorchCompile):
    """torch.compile forward, both compiled in ``setup``."""

    passes = "fwd"


class TorchCompileFwdBwd(_TorchCompile):
    """torch.compile forward+backward, both compiled in ``setup``."""

    passes = "fwd_bwd"


# --------------------------------------------------------------------------------------------
# jax.jit


class _JaxJit:
    passes = "fwd"
    params = (list(SHAPES), list(DTYPES), ["multixent", "optax"])
    param_names = ("shape", "dtype", "impl")
    timeout = 900

    def setup(self, s: str, dtype: str, impl: str) -> None:
        import jax

        self.block = jax.block_until_ready
        self.x, self.y = jax_inputs(*shape(s), dtype)
        f = jax_loss(impl)
        self.f = jax.jit(f if self.passes == "fwd" else jax.value_and_grad(f))
        self.time_call(s, dtype, impl)  # compile

    def time_call(self, s: str, dtype: str, impl: str) -> None:
        self.block(self.f(self.x, self.y))


class JaxJitFwd(_JaxJit):
    """``jax.jit`` forward."""

    passes = "fwd"


class JaxJitValueAndGrad(_JaxJit):
    """``jax.jit(jax.value_and_grad(loss))``."""

    passes = "fwd_bwd"


class JaxJitRatio:
    """``jax.jit`` multixent / optax timed in one process (:func:`alternating_best`), both compiled in
    ``setup``: at the points where a call takes under ~2 ms, the ratio of two asv processes carries
    their speed difference (see :class:`TorchEagerRatio`)."""

    params = (list(RATIO_SHAPES), list(DTYPES))
    param_names = ("shape", "dtype")
    unit = "multixent / native"
    processes = 1
    timeout = 900

    def setup(self, s: str, dtype: str) -> None:
        import jax

        self.x, self.y = jax_inputs(*shape(s), dtype)
        self.fwd = [jax.jit(jax_loss(impl)) for impl in ("multixent", "optax")]
        self.fwd_bwd = [jax.jit(jax.value_and_grad(jax_loss(impl))) for impl in ("multixent", "optax")]

    def _ratio(self, fs: list[Any]) -> float:
        import jax

        mine, native = alternating_best(*(lambda f=f: jax.block_until_ready(f(self.x, self.y)) for f in fs))
        return mine / native

    def track_fwd(self, s: str, dtype: str) -> float:
        return self._ratio(self.fwd)

    def track_fwd_bwd(self, s: str, dtype: str) -> float:
        return self._ratio(self.fwd_bwd)


class JaxJitMemory:
    """``jax.jit`` temp + output bytes (``memory_analysis()``) ÷ the logits' bytes."""

    params = (list(SHAPES), list(DTYPES), ["multixent", "optax"])
    param_names = ("shape", "dtype", "impl")
    unit = "x logits bytes"
    processes = 1  # deterministic: XLA's static analysis
    timeout = 900

    def setup(self, s: str, dtype: str, impl: str) -> None:
        self.x, self.y = jax_inputs(*shape(s), dtype)
        self.f = jax_loss(impl)
        self.logits = logits_bytes(s, dtype)

    def track_fwd(self, s: str, dtype: str, impl: str) -> float:
        return xla_extra_bytes(self.f, self.x, self.y) / self.logits

    def track_fwd_bwd(self, s: str, dtype: str, impl: str) -> float:
        import jax

        return xla_extra_bytes(jax.value_and_grad(self.f), self.x, self.y) / self.logits


# --------------------------------------------------------------------------------------------
# NumPy (float32)

NUMPY_IMPLS = ["multixent", "scipy", "multixent_and_grad", "numpy_grad"]


class NumPy:
    """NumPy time: the forward against SciPy's, ``cross_entropy_and_grad`` against the hand-written gradient."""

    params = (list(SHAPES), NUMPY_IMPLS)
    param_names = ("shape", "impl")

    def setup(self, s: str, impl: str) -> None:
        self.f = numpy_fn(impl)
        self.x, self.y = numpy_inputs(*shape(s))
        self.time_call(s, impl)  # lazy imports and first-call work, not timed

    def time_call(self, s: str, impl: str) -> None:
        self.f(self.x, self.y)


class NumPyRatio:
    """NumPy ``impl`` / SciPy timed in one process (:func:`alternating_best`; see :class:`TorchEagerRatio`): the
    forward against SciPy's, ``cross_entropy_and_grad`` against the hand-written gradient. ``impl``: multixent
    or the floor (:func:`numpy_floor`, :func:`numpy_floor_and_grad`)."""

    params = (list(RATIO_SHAPES), ["multixent", "floor"])
    param_names = ("shape", "impl")
    unit = "impl / native"
    processes = 1

    def setup(self, s: str, impl: str) -> None:
        self.x, self.y = numpy_inputs(*shape(s))

    def _ratio(self, mine: str, native: str) -> float:
        fs = (numpy_fn(mine), numpy_fn(native))
        a, b = alternating_best(*(lambda f=f: f(self.x, self.y) for f in fs))
        return a / b

    def track_fwd(self, s: str, impl: str) -> float:
        return self._ratio(impl, "scipy")

    def track_and_grad(self, s: str, impl: str) -> float:
        return self._ratio(f"{impl}_and_grad", "numpy_grad")


class NumPyMemory:
    """NumPy peak RSS; extra = ``peakmem_call - peakmem_baseline``."""

    params = (list(MEMORY_SHAPES), NUMPY_IMPLS)
    param_names = ("shape", "impl")
    processes = 1  # asv keeps one value per peakmem, the last process's

    def setup(self, s: str, impl: str) -> None:
        self.f = numpy_fn(impl)
        n, c = shape(s)
        self.f(*numpy_inputs(_warmup_rows(n, c), c))
        self.x, self.y = numpy_inputs(n, c)

    def peakmem_baseline(self, s: str, impl: str) -> None:
        pass

    def peakmem_call(self, s: str, impl: str) -> None:
        self.f(self.x, self.y)
