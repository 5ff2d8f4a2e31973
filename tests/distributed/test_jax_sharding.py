"""JAX automatic sharding: ``jax.jit`` with ``NamedSharding`` on 4 devices (issue 11, item 4).

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is
imported, so it runs in its own process: ``nox -s distributed``. With fewer
devices every test here skips.

On a mesh split over the classes, one over the batch, and a 2-D (batch ×
classes) mesh: values and gradients equal the unsharded call, gradients are
sharded like their inputs, the compiled HLO all-gathers nothing larger than a
per-row vector, and each device's temp + output bytes stay near its local
logits' bytes (``linear_cross_entropy``: a quarter of them).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _jax_devices import FOUR_DEVICES, device_mesh, jax, jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import multixent as mx

pytestmark = FOUR_DEVICES

#: name -> (mesh shape, mesh axis names, batch axis, class axis)
MESHES = {
    "classes": ((4,), ("model",), None, "model"),
    "batch": ((4,), ("data",), "data", None),
    "batch-x-classes": ((2, 2), ("data", "model"), "data", "model"),
}

#: cross_entropy options; "probs" means probability targets
OPTIONS = {
    "plain": {},
    "weight-ignore": {"weight": True},
    "label-smoothing": {"label_smoothing": 0.1},
    "z-loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0},
    "probs": {"probs": True, "label_smoothing": 0.2},
    "every-option-sum": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "reduction": "sum"},
    "none": {"weight": True, "reduction": "none"},
}

#: the options whose value_and_grad holds ≤ 1.05x the logits also unsharded; the others
#: take 2-3x the logits with or without sharding (see test_memory_cross_entropy)
LEAN = ("plain", "weight-ignore", "z-loss", "none")


def _mesh(name: str) -> tuple[Mesh, str | None, str | None]:
    shape, axes, batch, classes = MESHES[name]
    return device_mesh(shape, axes), batch, classes


def _put(a: np.ndarray, mesh: Mesh, *spec: str | None) -> jax.Array:
    return jax.device_put(jnp.asarray(a), NamedSharding(mesh, P(*spec)))


def _data(rows: int, classes: int, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, rows)
    target[::5] = -100  # ignored rows on every shard of the batch
    probs = rng.random((rows, classes))
    return {
        "x": (3 * rng.standard_normal((rows, classes))).astype(dtype),
        "index": target,
        "probs": (probs / probs.sum(-1, keepdims=True)).astype(dtype),
        "weight": rng.random(classes).astype(dtype),
    }


def _loss_fn(opts: dict):
    """``f(x, target, weight) -> scalar`` for these options (a "none" result is summed)."""
    kw = {k: v for k, v in opts.items() if k not in ("weight", "probs")}
    use_weight = opts.get("weight", False)

    def f(x, target, weight):
        out = mx.cross_entropy(x, target, weight=weight if use_weight else None, **kw)
        return jnp.sum(out) if out.ndim else out

    return f


def _args(name: str, opts: dict, data: dict) -> tuple[tuple, tuple]:
    """(unsharded, sharded) arguments ``(x, target, weight)``."""
    mesh, batch, classes = _mesh(name)
    target = data["probs"] if opts.get("probs") else data["index"]
    plain = (jnp.asarray(data["x"]), jnp.asarray(target), jnp.asarray(data["weight"]))
    t_spec = (batch, classes) if opts.get("probs") else (batch,)
    sharded = (_put(data["x"], mesh, batch, classes), _put(target, mesh, *t_spec), _put(data["weight"], mesh, classes))
    return plain, sharded


def _tol(dtype: str) -> float:
    return 1e-12 if dtype == "float64" else 64 * float(np.finfo(dtype).eps)


def _close(actual, expected, dtype: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=_tol(dtype), atol=_tol(dtype) * scale)


CASES = [(o, "float64") for o in OPTIONS] + [(o, "float32") for o in ("plain", "every-option-sum", "probs")]


@pytest.mark.parametrize(("option", "dtype"), CASES)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_cross_entropy_value_and_grad(mesh: str, option: str, dtype: str) -> None:
    opts = OPTIONS[option]
    plain, sharded = _args(mesh, opts, _data(32, 64, dtype))
    f = _loss_fn(opts)
    vg = jax.jit(jax.value_and_grad(f))
    ref_value, ref_grad = vg(*plain)
    value, grad = vg(*sharded)
    _close(jax.jit(f)(*sharded), ref_value, dtype)
    _close(value, ref_value, dtype)
    _close(grad, ref_grad, dtype)
    assert grad.sharding.is_equivalent_to(sharded[0].sharding, 2), (grad.sharding, sharded[0].sharding)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_cross_entropy_reductions_and_and_grad(mesh: str) -> None:
    """reduction="none" keeps the batch's sharding; cross_entropy_and_grad under jit matches too."""
    data = _data(32, 64, "float64")
    plain, sharded = _args(mesh, {}, data)
    per_row = jax.jit(lambda x, t: mx.cross_entropy(x, t, reduction="none", z_loss=1e-3))
    out = per_row(*sharded[:2])
    _close(out, per_row(*plain[:2]), "float64")
    _, batch, _ = _mesh(mesh)
    assert out.sharding.is_equivalent_to(NamedSharding(_mesh(mesh)[0], P(batch)), 1)
    both = jax.jit(lambda x, t, w: mx.cross_entropy_and_grad(x, t, weight=w, label_smoothing=0.1, reduction="sum"))
    (v, g), (rv, rg) = both(*sharded), both(*plain)
    _close(v, rv, "float64")
    _close(g, rg, "float64")


# --------------------------------------------------------------------------
# Compiled HLO and memory


def _all_gathers(hlo: str) -> list[tuple[str, int]]:
    """``(shape, elements)`` of every array an ``all-gather`` returns in the HLO text."""
    found = []
    for line in hlo.splitlines():
        head = re.split(r"\ball-gather(?:-start)?\(", line, maxsplit=1)
        if len(head) == 2 and "=" in head[0]:
            for shape in re.findall(r"\w+\[([\d,]*)\]", head[0].split("=", 1)[1]):
                dims = [int(d) for d in shape.split(",") if d]
                found.append((shape, int(np.prod(dims))))
    return found


def _compiled(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    stats = compiled.memory_analysis()
    return compiled.as_text(), stats.temp_size_in_bytes + stats.output_size_in_bytes


def _devices_on(mesh: str) -> tuple[int, int]:
    """How many shards the batch and the classes are split into."""
    shape, axes, batch, classes = MESHES[mesh]
    size = dict(zip(axes, shape, strict=True))
    return size.get(batch, 1), size.get(classes, 1)


ROWS, CLASSES = 256, 2048  # float32: 2 MiB of logits, 512 KiB per device


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_memory_cross_entropy(mesh: str, option: str) -> None:
    """No logits-sized all-gather; per-device temp+output ≤ 1.05x the local logits' bytes.

    With label smoothing, softcap or probability targets, value_and_grad holds 2-3x the
    logits also unsharded (XLA keeps exp(s) beside the gradient): there the sharded
    figure must not exceed the unsharded one's ratio by more than 0.05.
    """
    opts = OPTIONS[option]
    plain, sharded = _args(mesh, opts, _data(ROWS, CLASSES, "float32"))
    nb, nc = _devices_on(mesh)
    local = plain[0].nbytes / (nb * nc)
    for f in (_loss_fn(opts), jax.value_and_grad(_loss_fn(opts))):
        hlo, extra = _compiled(f, *sharded)
        big = [(s, n) for s, n in _all_gathers(hlo) if n > ROWS]
        assert not big, f"all-gathers larger than a per-row vector: {big}"
        limit = 1.05
        if option not in LEAN:
            limit = _compiled(f, *plain)[1] / plain[0].nbytes + 0.05
        assert extra <= limit * local, f"{extra / local:.3f}x the local logits (limit {limit:.3f})"


# --------------------------------------------------------------------------
# linear_cross_entropy: classifier sharded by vocabulary rows, hidden by batch


def _linear_args(mesh: str, rows: int, vocab: int, dim: int, dtype: str):
    rng = np.random.default_rng(1)
    h = rng.standard_normal((rows, dim)).astype(dtype)
    w = (rng.standard_normal((vocab, dim)) / np.sqrt(dim)).astype(dtype)
    b = rng.standard_normal(vocab).astype(dtype)
    y = rng.integers(0, vocab, rows)
    y[::5] = -100
    m, batch, classes = _mesh(mesh)
    plain = tuple(jnp.asarray(a) for a in (h, w, b, y))
    sharded = (_put(h, m, batch, None), _put(w, m, classes, None), _put(b, m, classes), _put(y, m, batch))
    return plain, sharded


def _linear_fn(chunk: int, **kw):
    return jax.value_and_grad(
        lambda h, w, b, y: mx.linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, **kw), argnums=(0, 1, 2)
    )


@pytest.mark.parametrize(("mesh", "dtype"), [(m, "float64") for m in MESHES] + [("batch-x-classes", "float32")])
def test_linear_value_and_grad(mesh: str, dtype: str) -> None:
    plain, sharded = _linear_args(mesh, 32, 16, 4, dtype)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "weight": plain[2] * 0 + 0.5}
    vg = jax.jit(_linear_fn(8, **kw))
    ref_value, ref_grads = vg(*plain)
    value, grads = vg(*sharded)
    _close(value, ref_value, dtype)
    for g, r, a in zip(grads, ref_grads, sharded[:3], strict=True):
        _close(g, r, dtype)
        assert g.sharding.is_equivalent_to(a.sharding, a.ndim), (g.sharding, a.sharding)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_memory_linear(mesh: str) -> None:
    """No classifier- or logits-sized all-gather; temp+output ≤ 0.25x the local logits' bytes."""
    rows, vocab, dim = 2048, 1024, 16
    _, sharded = _linear_args(mesh, rows, vocab, dim, "float32")
    nb, nc = _devices_on(mesh)
    hlo, extra = _compiled(_linear_fn(64), *sharded)
    big = [(s, n) for s, n in _all_gathers(hlo) if n > rows]
    assert not big, f"all-gathers larger than a per-row vector: {big}"
    local = rows * vocab * 4 / (nb * nc)
    assert extra <= 0.25 * local, f"{extra / local:.3f}x the local logits"
