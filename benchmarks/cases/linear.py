"""``multixent.linear_cross_entropy`` (fused, chunked) against the naive ``h @ W.T`` path (issue 4).

Forward+backward (the gradients of ``hidden`` and ``classifier``), mean reduction, fp32, N=8192
rows, D=512, no bias. torch eager: vs ``F.cross_entropy(h @ W.T, y)``; memory is peak RSS,
``peakmem_fwd_bwd - peakmem_baseline`` (the gradients left in ``.grad`` count). ``jax.jit``:
``jax.value_and_grad`` (argnums 0 and 1) vs optax on ``h @ W.T``; memory is ``memory_analysis()``
temp + output. The naive path is not run above V=32768 (at V=131072 its logits alone take 4 GiB);
JAX's naive memory there is still the analysis of the compiled, unexecuted function.
"""

from __future__ import annotations

from typing import Any

from ._common import LINEAR_D, LINEAR_N, LINEAR_NAIVE_MAX_V, LINEAR_V, THREADS, skip, xla_extra_bytes

IMPLS = ["fused", "naive"]


def torch_inputs(n: int, d: int, v: int) -> tuple[Any, Any, Any]:
    import torch

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    h = torch.empty(n, d).normal_(generator=g)
    w = torch.empty(v, d).normal_(0.0, d**-0.5, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    return h.requires_grad_(True), w.requires_grad_(True), y


def torch_loss(impl: str) -> Any:
    if impl == "fused":
        import multixent

        return multixent.linear_cross_entropy
    import torch.nn.functional as F

    return lambda h, w, y: F.cross_entropy(h @ w.T, y)


def jax_inputs(n: int, d: int, v: int) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    kh, kw, ky = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (n, d), jnp.float32)
    w = jax.random.normal(kw, (v, d), jnp.float32) * d**-0.5
    y = jax.random.randint(ky, (n,), 0, v, dtype=jnp.int32)
    return jax.block_until_ready((h, w, y))


def jax_value_and_grad(impl: str) -> Any:
    import jax

    if impl == "fused":
        import multixent

        f = multixent.linear_cross_entropy
    else:
        import optax

        def f(h: Any, w: Any, y: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean()

    return jax.value_and_grad(f, argnums=(0, 1))


class _Slow:
    params = (list(LINEAR_V), IMPLS)
    param_names = ("V", "impl")
    timeout = 1800
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0


class _TorchLinearSetup(_Slow):
    def setup(self, v: int, impl: str) -> None:
        if impl == "naive" and v > LINEAR_NAIVE_MAX_V:
            skip("naive path not run: its logits alone take 4 GiB")
        self.f = torch_loss(impl)
        self.f(*torch_inputs(64, LINEAR_D, min(v, 8192))).backward()  # initialisation, not counted
        self.h, self.w, self.y = torch_inputs(LINEAR_N, LINEAR_D, v)


class TorchLinear(_TorchLinearSetup):
    """torch eager forward+backward time."""

    def time_fwd_bwd(self, v: int, impl: str) -> None:
        self.h.grad = self.w.grad = None
        self.f(self.h, self.w, self.y).backward()


class TorchLinearMemory(_TorchLinearSetup):
    """torch eager peak RSS; extra = ``peakmem_fwd_bwd - peakmem_baseline`` (gradients included)."""

    processes = 1  # asv keeps one value per peakmem, the last process's

    def peakmem_baseline(self, v: int, impl: str) -> None:
        pass

    def peakmem_fwd_bwd(self, v: int, impl: str) -> None:
        self.f(self.h, self.w, self.y).backward()


class JaxLinear(_Slow):
    """``jax.jit`` value_and_grad time (compiled and warmed up in ``setup``)."""

    def setup(self, v: int, impl: str) -> None:
        import jax

        if impl == "naive" and v > LINEAR_NAIVE_MAX_V:
            skip("naive path not run: its logits alone take 4 GiB")
        self.block = jax.block_until_ready
        self.args = jax_inputs(LINEAR_N, LINEAR_D, v)
        self.f = jax.jit(jax_value_and_grad(impl))
        self.time_fwd_bwd(v, impl)

    def time_fwd_bwd(self, v: int, impl: str) -> None:
        self.block(self.f(*self.args))


class JaxLinearMemory:
    """``jax.jit`` value_and_grad temp + output bytes ÷ logits bytes (compiled, not run)."""

    params = (list(LINEAR_V), IMPLS)
    param_names = ("V", "impl")
    unit = "x logits bytes"
    processes = 1
    timeout = 1800

    def setup(self, v: int, impl: str) -> None:
        import jax
        import jax.numpy as jnp

        self.args = [
            jax.ShapeDtypeStruct(s, t)
            for s, t in (((LINEAR_N, LINEAR_D), jnp.float32), ((v, LINEAR_D), jnp.float32), ((LINEAR_N,), jnp.int32))
        ]

    def track_fwd_bwd(self, v: int, impl: str) -> float:
        return xla_extra_bytes(jax_value_and_grad(impl), *self.args) / (LINEAR_N * v * 4)
