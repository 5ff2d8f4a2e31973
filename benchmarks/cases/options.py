"""Memory of each option at the acceptance point (N=4096, C=32000, fp32, forward+backward; issue 12).

``option`` is one of: none, ``softcap=30``, ``label_smoothing=0.1``, class ``weight`` (random in
[0.5, 1.5)), ``z_loss=1e-4``. The native loss with the same option: torch's ``F.cross_entropy``
(``label_smoothing``, ``weight``), with ``30·tanh(x/30)`` for softcap and ``+ c·mean(lse²)`` for
the z-loss; for JAX, optax's integer-label loss on the same expressions (smoothing through
``optax.smooth_labels`` of the one-hot target, weights as ``Σ w_y·loss / Σ w_y``).

torch: peak RSS (``peakmem_fwd_bwd - peakmem_baseline``); JAX: ``memory_analysis()`` temp + output.
"""

from __future__ import annotations

from typing import Any

from ._common import ACCEPT, jax_inputs, logits_bytes, shape, torch_inputs

OPTIONS = ["none", "softcap", "label_smoothing", "weight", "z_loss"]
SOFTCAP, SMOOTHING, Z_LOSS = 30.0, 0.1, 1e-4


def _kwargs(option: str, weight: Any) -> dict[str, Any]:
    return {
        "none": {},
        "softcap": {"softcap": SOFTCAP},
        "label_smoothing": {"label_smoothing": SMOOTHING},
        "weight": {"weight": weight},
        "z_loss": {"z_loss": Z_LOSS},
    }[option]


def torch_loss(impl: str, option: str, c: int) -> Any:
    import torch
    import torch.nn.functional as F

    w = torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5
    kw = _kwargs(option, w)
    if impl == "multixent":
        import multixent

        return lambda x, y: multixent.cross_entropy(x, y, **kw)
    if option == "softcap":
        return lambda x, y: F.cross_entropy(SOFTCAP * torch.tanh(x / SOFTCAP), y)
    if option == "z_loss":
        return lambda x, y: F.cross_entropy(x, y) + Z_LOSS * (torch.logsumexp(x, -1) ** 2).mean()
    return lambda x, y: F.cross_entropy(x, y, **kw)


def jax_loss(impl: str, option: str, c: int) -> Any:
    import jax
    import jax.numpy as jnp
    import optax

    w = jax.random.uniform(jax.random.key(1), (c,)) + 0.5
    kw = _kwargs(option, w)
    if impl == "multixent":
        import multixent

        return lambda x, y: multixent.cross_entropy(x, y, **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels
    if option == "softcap":
        return lambda x, y: ce(SOFTCAP * jnp.tanh(x / SOFTCAP), y).mean()
    if option == "label_smoothing":
        return lambda x, y: optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, c), SMOOTHING)).mean()
    if option == "weight":
        return lambda x, y: (w[y] * ce(x, y)).sum() / w[y].sum()
    if option == "z_loss":
        return lambda x, y: ce(x, y).mean() + Z_LOSS * (jax.nn.logsumexp(x, -1) ** 2).mean()
    return lambda x, y: ce(x, y).mean()


class TorchOptionsMemory:
    """torch eager forward+backward peak RSS per option at the acceptance point."""

    params = (OPTIONS, ["multixent", "native"])
    param_names = ("option", "impl")
    processes = 1  # asv keeps one value per peakmem, the last process's

    def setup(self, option: str, impl: str) -> None:
        n, c = shape(ACCEPT)
        self.f = torch_loss(impl, option, c)
        w, wy = torch_inputs(8, c)  # library initialisation, not counted
        w.requires_grad_(True)
        self.f(w, wy).backward()
        del w, wy
        self.x, self.y = torch_inputs(n, c)
        self.x.requires_grad_(True)

    def peakmem_baseline(self, option: str, impl: str) -> None:
        pass

    def peakmem_fwd_bwd(self, option: str, impl: str) -> None:
        self.f(self.x, self.y).backward()


class JaxOptionsMemory:
    """``jax.jit(jax.value_and_grad(loss))`` temp + output bytes ÷ logits bytes per option."""

    params = (OPTIONS, ["multixent", "optax"])
    param_names = ("option", "impl")
    unit = "x logits bytes"
    processes = 1
    timeout = 900

    def setup(self, option: str, impl: str) -> None:
        n, c = shape(ACCEPT)
        self.f = jax_loss(impl, option, c)
        self.x, self.y = jax_inputs(n, c)

    def track_fwd_bwd(self, option: str, impl: str) -> float:
        import jax

        from ._common import xla_extra_bytes

        return xla_extra_bytes(jax.value_and_grad(self.f), self.x, self.y) / logits_bytes(ACCEPT)
