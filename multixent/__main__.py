"""Self-check: ``python -m multixent``.

For every installed backend (NumPy always) computes the loss and gradient of a
small batch with multixent and with that backend's native loss, prints a table
and exits non-zero if any differs beyond a float64 tolerance.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import multixent

TOLERANCE = 1e-10
OPTIONS: dict[str, Any] = {"label_smoothing": 0.1, "ignore_index": 3}


def _batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5)) * 3
    target = rng.integers(0, 5, 8)
    target[1] = OPTIONS["ignore_index"]
    weight = rng.uniform(0.5, 2.0, 5)
    return logits, target, weight


def _target_distribution(target: np.ndarray, weight: np.ndarray, classes: int) -> tuple[np.ndarray, float]:
    """torch's loss as ``Σ_rows -a·log_softmax / denominator``: the rows ``a`` and the denominator."""
    eps = OPTIONS["label_smoothing"]
    counted = target != OPTIONS["ignore_index"]
    index = np.where(counted, target, 0)
    onehot = np.eye(classes)[index]
    a = ((1 - eps) * onehot + eps / classes) * weight * counted[:, None]
    return a, float((weight[index] * counted).sum())


def _numpy_reference(logits: np.ndarray, target: np.ndarray, weight: np.ndarray) -> tuple[float, np.ndarray]:
    """torch's formula written out in NumPy, with its closed-form gradient."""
    a, denominator = _target_distribution(target, weight, logits.shape[-1])
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    loss = -(a * log_p).sum() / denominator
    grad = (np.exp(log_p) * a.sum(-1, keepdims=True) - a) / denominator
    return float(loss), grad


def _numpy() -> tuple[str, float, float, float]:
    logits, target, weight = _batch()
    loss, grad = multixent.cross_entropy_and_grad(logits, target, weight=weight, **OPTIONS)
    ref_loss, ref_grad = _numpy_reference(logits, target, weight)
    diff = max(abs(float(loss) - ref_loss), float(np.abs(grad - ref_grad).max()))
    return np.__version__, float(loss), ref_loss, diff


def _torch() -> tuple[str, float, float, float]:
    import torch
    import torch.nn.functional as F

    logits, target, weight = (torch.from_numpy(a) for a in _batch())
    results = []
    for loss_fn in (multixent.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, target, weight=weight, **OPTIONS)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((float(loss.detach()), grad))
    (ours, g_ours), (native, g_native) = results
    diff = max(abs(ours - native), float((g_ours - g_native).abs().max()))
    return torch.__version__, ours, native, diff


def _jax() -> tuple[str, float, float, float]:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # type: ignore[no-untyped-call]
    logits, target, weight = _batch()
    # optax has no weights, smoothing or ignore_index: its loss of the target distribution they make
    a, denominator = _target_distribution(target, weight, logits.shape[-1])
    logits, target, weight, a = (jnp.asarray(v) for v in (logits, target, weight, a))  # type: ignore[assignment]

    def ours(x: Any) -> Any:
        return multixent.cross_entropy(x, target, weight=weight, **OPTIONS)

    def native(x: Any) -> Any:
        try:
            import optax
        except ImportError:  # optax is optional: its formula in jax.numpy
            return -(a * jax.nn.log_softmax(x)).sum() / denominator
        return optax.softmax_cross_entropy(x, a).sum() / denominator

    (l_ours, g_ours), (l_native, g_native) = (jax.jit(jax.value_and_grad(f))(logits) for f in (ours, native))
    diff = max(abs(float(l_ours) - float(l_native)), float(jnp.abs(g_ours - g_native).max()))
    return jax.__version__, float(l_ours), float(l_native), diff


CHECKS: dict[str, tuple[str, Callable[[], tuple[str, float, float, float]]]] = {
    "numpy": ("float64 formula in NumPy", _numpy),
    "torch": ("torch.nn.functional.cross_entropy", _torch),
    "jax": ("optax.softmax_cross_entropy, under jit", _jax),
}


def main() -> int:
    rows = []
    failed = False
    for name, (native_name, check) in CHECKS.items():
        if name != "numpy" and importlib.util.find_spec(name) is None:
            rows.append((name, "-", "-", "-", "-", "not installed"))
            continue
        version, ours, native, diff = check()
        ok = diff <= TOLERANCE
        failed |= not ok
        rows.append((name, version, f"{ours:.10f}", f"{native:.10f}", f"{diff:.1e}", "ok" if ok else "DIFFERS"))
        rows[-1] = (*rows[-1][:5], rows[-1][5] + f" (vs {native_name})")
    header = ("backend", "version", "loss", "native", "max diff", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"loss and gradient of an (8, 5) float64 batch; tolerance {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
