"""``group=`` inside ``jax.shard_map``: the class axis split over 4 devices (issue 11, item 1).

Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX is
imported, so it runs in its own process: ``nox -s distributed``. With fewer
devices every test here skips.

Every value and gradient is compared with the unsharded call on the same data
(float64 to 1e-12 relative; float32 and bfloat16 at tolerances scaled by their
epsilon), for every option, with targets on every shard, ignored and out of range.
"""

from __future__ import annotations

import numpy as np
import pytest
from _cases import sharded_options
from _jax_devices import FOUR_DEVICES, device_mesh, jax, jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import multixent as mx

pytestmark = FOUR_DEVICES

N, C = 10, 12
#: class indices on each of the 4 shards (3 classes each), the first and last of each, and ignored rows
TARGET = np.array([0, 2, 3, 5, 6, 8, 9, 11, -100, 4])

#: cross_entropy options; "weight" means the full (C,) class weights, "probs" probability targets
OPTIONS = sharded_options(ignore_class=7)

#: mesh axes the classes are split over: one axis, and a tuple of two (2 x 2 devices)
MESHES = {"axis": ((4,), ("model",), "model"), "two-axes": ((2, 2), ("a", "b"), ("a", "b"))}

TOL = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 2e-2}


def _mesh(name: str = "axis") -> tuple[Mesh, str | tuple[str, ...]]:
    shape, axes, group = MESHES[name]
    return device_mesh(shape, axes), group


def _data(dtype: str = "float64", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C)) * 3
    probs = rng.dirichlet(np.ones(C), size=N)
    return {
        "x": jnp.asarray(x, dtype=dtype),
        "target": jnp.asarray(TARGET),
        "probs": jnp.asarray(probs, dtype=dtype),
        "weight": jnp.asarray(rng.uniform(0.5, 2.0, size=C), dtype=dtype),
    }


def _call(spec: dict, data: dict) -> tuple[dict, object]:
    kw = {k: v for k, v in spec.items() if k not in ("weight", "probs")}
    if spec.get("weight"):
        kw["weight"] = data["weight"]
    if spec.get("probs"):
        return kw, data["probs"]
    if "ignore_index" in kw:  # that class instead of -100, twice
        return kw, jnp.where(data["target"] == -100, kw["ignore_index"], data["target"])
    return kw, data["target"]


def _sharded(fn, mesh: Mesh, group, target_sharded: bool, out_specs):
    """``fn(x_local, target)`` under ``shard_map``, logits split over ``group`` on their class axis."""
    classes = P(None, group)
    return jax.shard_map(fn, mesh=mesh, in_specs=(classes, classes if target_sharded else P()), out_specs=out_specs)


def _close(actual, expected, dtype: str) -> None:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    tol = TOL[dtype]
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(e), initial=0.0))))


#: (option, dtype, mesh): every option in float64 on one axis; the richest in float32 and over two axes
CASES = [
    *((o, "float64", "axis") for o in OPTIONS),
    *(
        (o, d, m)
        for o in ("every-option-sum", "probs-smoothing-weight")
        for d, m in (("float32", "axis"), ("float64", "two-axes"))
    ),
]


@pytest.mark.parametrize(("option", "dtype", "mesh_name"), CASES, ids=["-".join(c) for c in CASES])
def test_value_and_grad_equal_the_unsharded_call(option, dtype, mesh_name):
    spec, data = OPTIONS[option], _data(dtype)
    mesh, group = _mesh(mesh_name)
    kw, target = _call(spec, data)
    none = spec.get("reduction") == "none"

    def loss(x_local, t):
        return mx.cross_entropy(x_local, t, group=group, **kw)

    sharded = _sharded(loss, mesh, group, bool(spec.get("probs")), P())

    def value_and_grad(f):  # the value and the gradient of a weighted sum of the per-row losses ("none")
        scale = jnp.arange(1.0, N + 1, dtype=dtype) if none else 1.0
        # one compile for both (test time), the reference under jit too
        return jax.jit(lambda x: (f(x, target), jax.grad(lambda x: jnp.sum(scale * f(x, target)))(x)))

    value, grad = value_and_grad(sharded)(data["x"])
    expected_value, expected_grad = value_and_grad(lambda x, t: mx.cross_entropy(x, t, **kw))(data["x"])
    _close(value, expected_value, dtype)
    _close(grad, expected_grad, dtype)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "none"])
def test_cross_entropy_and_grad(option):
    spec, data = OPTIONS[option], _data()
    mesh, group = _mesh()
    kw, target = _call(spec, data)

    def both(x_local, t):
        return mx.cross_entropy_and_grad(x_local, t, group=group, **kw)

    sharded = _sharded(both, mesh, group, bool(spec.get("probs")), (P(), P(None, group)))
    loss, grad = jax.jit(sharded)(data["x"], target)
    expected_loss, expected_grad = mx.cross_entropy_and_grad(data["x"], target, **kw)
    _close(loss, expected_loss, "float64")
    _close(grad, expected_grad, "float64")


def test_bfloat16():
    data = _data("bfloat16")
    mesh, group = _mesh()
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "weight": data["weight"]}
    sharded = _sharded(lambda x, t: mx.cross_entropy(x, t, group=group, **kw), mesh, group, False, P())
    loss = sharded(data["x"], data["target"])
    assert loss.dtype == jnp.bfloat16
    _close(loss, mx.cross_entropy(data["x"], data["target"], **kw), "bfloat16")
    grad = jax.grad(lambda x: sharded(x, data["target"]).astype(jnp.float32))(data["x"])
    expected = jax.grad(lambda x: mx.cross_entropy(x, data["target"], **kw).astype(jnp.float32))(data["x"])
    assert grad.dtype == jnp.bfloat16
    _close(grad, expected, "bfloat16")


def test_weight_gradient():
    """The full (C,) class weights, replicated: their gradient sums every shard's part."""
    data = _data()
    mesh, group = _mesh()
    kw = {"label_smoothing": 0.2}

    def loss(x, t, w):
        return mx.cross_entropy(x, t, weight=w, group=group, **kw)

    sharded = jax.shard_map(loss, mesh=mesh, in_specs=(P(None, group), P(), P()), out_specs=P())
    args = (data["x"], data["target"], data["weight"])
    grads = jax.grad(sharded, argnums=(0, 2))(*args)
    expected = jax.grad(lambda x, t, w: mx.cross_entropy(x, t, weight=w, **kw), argnums=(0, 2))(*args)
    for g, e in zip(grads, expected, strict=True):
        _close(g, e, "float64")


def test_vmap_inside_shard_map():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, N, C)))
    target = jnp.asarray(np.stack([TARGET, np.roll(TARGET, 1), np.roll(TARGET, 2)]))
    mesh, group = _mesh()
    kw = {"label_smoothing": 0.1, "softcap": 4.0}

    def per_batch(x_local, t):
        return jax.vmap(lambda a, b: mx.cross_entropy(a, b, group=group, **kw))(x_local, t)

    sharded = jax.shard_map(per_batch, mesh=mesh, in_specs=(P(None, None, group), P()), out_specs=P())
    expected = jax.vmap(lambda a, b: mx.cross_entropy(a, b, **kw))(x, target)
    _close(jax.jit(sharded)(x, target), expected, "float64")
    grad = jax.grad(lambda a: jnp.sum(jnp.arange(1.0, 4.0) * sharded(a, target)))(x)
    expected_grad = jax.grad(
        lambda a: jnp.sum(jnp.arange(1.0, 4.0) * jax.vmap(lambda u, v: mx.cross_entropy(u, v, **kw))(a, target))
    )(x)
    _close(grad, expected_grad, "float64")


def test_class_axis_not_last():
    """(N, C, d) logits split on axis 1, as torch's layout."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, C, 4)))
    target = jnp.asarray(rng.integers(0, C, size=(3, 4)))
    mesh, group = _mesh()
    sharded = jax.shard_map(
        lambda a, t: mx.cross_entropy(a, t, axis=1, group=group, label_smoothing=0.1),
        mesh=mesh,
        in_specs=(P(None, group, None), P()),
        out_specs=P(),
    )
    _close(sharded(x, target), mx.cross_entropy(x, target, axis=1, label_smoothing=0.1), "float64")


def test_out_of_range_target_is_nan_when_traced():
    data = _data()
    mesh, group = _mesh()
    bad = jnp.asarray(TARGET).at[3].set(C)  # one past the global C: in range on no shard
    sharded = _sharded(lambda x, t: mx.cross_entropy(x, t, group=group, reduction="none"), mesh, group, False, P())
    out = np.asarray(sharded(data["x"], bad))
    assert np.isnan(out[3])
    np.delete(out, 3)
    expected = np.asarray(mx.cross_entropy(data["x"], jnp.asarray(TARGET), reduction="none"))
    _close(np.delete(out, 3), np.delete(expected, 3), "float64")


@pytest.mark.parametrize("value", [C, -1, 3 * C])
def test_out_of_range_target_raises_when_concrete(value):
    """Checked against the global C (12), not the shard's 3 classes."""
    data = _data()
    mesh, group = _mesh()
    bad = jnp.asarray(TARGET).at[0].set(value)
    sharded = jax.shard_map(
        lambda x: mx.cross_entropy(x, bad, group=group), mesh=mesh, in_specs=P(None, group), out_specs=P()
    )
    with pytest.raises(IndexError, match=rf"class index {value} .*0 <= index < {C}"):
        sharded(data["x"])
    ok = jax.shard_map(
        lambda x: mx.cross_entropy(x, jnp.asarray(TARGET), group=group),
        mesh=mesh,
        in_specs=P(None, group),
        out_specs=P(),
    )
    _close(ok(data["x"]), mx.cross_entropy(data["x"], jnp.asarray(TARGET)), "float64")


def test_logsumexp_and_log_softmax():
    data = _data()
    mesh, group = _mesh()
    x = data["x"]
    lse = jax.shard_map(lambda a: mx.logsumexp(a, group=group), mesh=mesh, in_specs=P(None, group), out_specs=P())
    lsm = jax.shard_map(
        lambda a: mx.log_softmax(a, group=group), mesh=mesh, in_specs=P(None, group), out_specs=P(None, group)
    )
    _close(lse(x), mx.logsumexp(x), "float64")
    _close(lsm(x), mx.log_softmax(x), "float64")
    # gradients through a downstream function of each (log_softmax's sums every shard's part)
    _close(
        jax.grad(lambda a: jnp.sum(jnp.sin(lse(a))))(x),
        jax.grad(lambda a: jnp.sum(jnp.sin(mx.logsumexp(a))))(x),
        "float64",
    )
    _close(
        jax.grad(lambda a: jnp.sum(jnp.sin(lsm(a))))(x),
        jax.grad(lambda a: jnp.sum(jnp.sin(mx.log_softmax(a))))(x),
        "float64",
    )


def test_extreme_rows():
    """A row of -inf but one entry (on one shard), a row holding +inf, logits near 1e8."""
    x = np.random.default_rng(3).normal(size=(4, C))
    x[0, :] = -np.inf
    x[0, 7] = 0.0
    x[1, 2] = np.inf
    x[2] += 1e8
    x = jnp.asarray(x)
    mesh, group = _mesh()
    lse = jax.shard_map(lambda a: mx.logsumexp(a, group=group), mesh=mesh, in_specs=P(None, group), out_specs=P())
    np.testing.assert_array_equal(np.isinf(lse(x)), np.isinf(mx.logsumexp(x)))
    _close(np.asarray(lse(x))[[0, 2, 3]], np.asarray(mx.logsumexp(x))[[0, 2, 3]], "float64")
    t = jnp.asarray([7, 0, 5, 11])
    ce = _sharded(lambda a, b: mx.cross_entropy(a, b, group=group, reduction="none"), mesh, group, False, P())
    expected = np.asarray(mx.cross_entropy(x, t, reduction="none"))
    np.testing.assert_array_equal(np.isnan(ce(x, t)), np.isnan(expected))
    _close(np.asarray(ce(x, t))[[0, 2, 3]], expected[[0, 2, 3]], "float64")


def test_errors():
    data = _data()
    mesh, group = _mesh()
    with pytest.raises(ValueError, match="class_offset applies to torch process groups"):
        jax.shard_map(
            lambda a: mx.cross_entropy(a, data["target"], group=group, class_offset=0),
            mesh=mesh,
            in_specs=P(None, group),
            out_specs=P(),
        )(data["x"])
    with pytest.raises(ValueError, match="not a mesh axis bound here"):
        mx.cross_entropy(data["x"], data["target"], group="model")
    with pytest.raises(TypeError, match="must be JAX arrays"):
        mx.cross_entropy(np.asarray(data["x"]), np.asarray(data["target"]), group="model")
    with pytest.raises(TypeError, match="group must be a JAX mesh axis name"):
        mx.cross_entropy(data["x"], data["target"], group=3)
    with pytest.raises(ValueError, match="class_offset applies with a group only"):
        mx.cross_entropy(data["x"], data["target"], class_offset=0)
    with pytest.raises(ValueError, match=r"replicated over mesh axis 'model'.*in_specs"):  # logits not split
        jax.shard_map(
            lambda a: mx.cross_entropy(a, data["target"], group=group), mesh=mesh, in_specs=P(), out_specs=P()
        )(data["x"])
    with pytest.raises(ValueError, match=r"needs jax\.shard_map's replication types"):
        jax.shard_map(
            lambda a: mx.logsumexp(a, group=group),
            mesh=mesh,
            in_specs=P(None, group),
            out_specs=P(),
            check_vma=False,
        )(data["x"])
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\)"):  # the full weight, not the shard's
        jax.shard_map(
            lambda a: mx.cross_entropy(a, data["target"], group=group, weight=data["weight"][:3]),
            mesh=mesh,
            in_specs=P(None, group),
            out_specs=P(),
        )(data["x"])


def test_linear_classifier_not_split_is_an_error():
    """group= with the classifier replicated over the axis (every member the whole vocabulary)."""
    rng = np.random.default_rng(5)
    h, w = jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=(C, 5)))
    mesh, group = _mesh()
    with pytest.raises(ValueError, match="classifier\\) is replicated over mesh axis 'model'"):
        jax.shard_map(
            lambda h, w: mx.linear_cross_entropy(h, w, jnp.asarray(TARGET), group=group),
            mesh=mesh,
            in_specs=(P(), P()),
            out_specs=P(),
        )(h, w)


#: linear_cross_entropy options (weight: the full (V,) class weights)
LINEAR_OPTIONS = {
    "plain": {},
    "every-option": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0, "weight": True},
    "none": {"reduction": "none", "label_smoothing": 0.2, "weight": True},
    "chunks-sum": {"chunk_size": 3, "label_smoothing": 0.1, "reduction": "sum"},
}


@pytest.mark.parametrize("option", list(LINEAR_OPTIONS))
def test_linear_cross_entropy_column_parallel(option):
    """classifier and bias split by vocabulary rows, hidden replicated: the loss and every
    gradient equal the unsharded call's (hidden's and weight's in full on every device)."""
    rng = np.random.default_rng(4)
    dim = 5
    h, w, b = (jnp.asarray(rng.normal(size=s)) for s in ((N, dim), (C, dim), (C,)))
    class_weight = jnp.asarray(rng.uniform(0.5, 2.0, size=C))
    target = jnp.asarray(TARGET)
    spec = dict(LINEAR_OPTIONS[option])
    weighted = spec.pop("weight", False)
    mesh, group = _mesh()

    def loss(h, w, b, cw, **extra):
        return mx.linear_cross_entropy(h, w, target, bias=b, weight=cw if weighted else None, **spec, **extra)

    sharded = jax.shard_map(
        lambda *a: loss(*a, group=group), mesh=mesh, in_specs=(P(), P(group), P(group), P()), out_specs=P()
    )
    args = (h, w, b, class_weight)
    _close(sharded(*args), loss(*args), "float64")
    scale = jnp.arange(1.0, N + 1) if spec.get("reduction") == "none" else 1.0
    argnums = (0, 1, 2, 3) if weighted else (0, 1, 2)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(scale * sharded(*a)), argnums=argnums))(*args)
    expected = jax.grad(lambda *a: jnp.sum(scale * loss(*a)), argnums=argnums)(*args)
    for g, e in zip(grads, expected, strict=True):
        _close(g, e, "float64")


@pytest.mark.parametrize("kind", ["indices", "probs"])
def test_traced_options(kind):
    """label_smoothing, z_loss and softcap as JAX arrays (issue 13) with group=: JAX differentiates the
    plain math inside shard_map; the value and the gradients (logits and options) are the unsharded call's."""
    data = _data()
    mesh, group = _mesh()
    target, spec = (data["target"], P()) if kind == "indices" else (data["probs"], P(None, group))
    options = (jnp.asarray(0.2), jnp.asarray(1e-2), jnp.asarray(3.0))

    def loss(x, t, o, **kw):
        return mx.cross_entropy(x, t, weight=data["weight"], label_smoothing=o[0], z_loss=o[1], softcap=o[2], **kw)

    sharded = jax.shard_map(
        lambda x, t, o: loss(x, t, o, group=group), mesh=mesh, in_specs=(P(None, group), spec, P()), out_specs=P()
    )
    args = (data["x"], target, options)
    _close(jax.jit(sharded)(*args), loss(*args), "float64")
    grads = jax.jit(jax.grad(sharded, argnums=(0, 2)))(*args)
    expected = jax.grad(loss, argnums=(0, 2))(*args)
    _close(grads[0], expected[0], "float64")
    _close(jnp.stack(grads[1]), jnp.stack(expected[1]), "float64")


def test_traced_options_linear():
    """linear_cross_entropy(group=) with array options: the unchunked plain math, per shard."""
    rng = np.random.default_rng(3)
    h, w = jnp.asarray(rng.normal(size=(N, 5))), jnp.asarray(rng.normal(size=(C, 5)))
    target = jnp.asarray(np.where(TARGET < 0, 1, TARGET))
    mesh, group = _mesh()
    options = (jnp.asarray(0.2), jnp.asarray(1e-2), jnp.asarray(3.0))

    def loss(h, w, o, **kw):
        return mx.linear_cross_entropy(h, w, target, label_smoothing=o[0], z_loss=o[1], softcap=o[2], **kw)

    sharded = jax.shard_map(
        lambda h, w, o: loss(h, w, o, group=group), mesh=mesh, in_specs=(P(), P(group), P()), out_specs=P()
    )
    _close(sharded(h, w, options), loss(h, w, options), "float64")
    grads = jax.grad(sharded, argnums=(0, 1, 2))(h, w, options)
    expected = jax.grad(loss, argnums=(0, 1, 2))(h, w, options)
    for g, e in zip(grads[:2], expected[:2], strict=True):
        _close(g, e, "float64")
    _close(jnp.stack(grads[2]), jnp.stack(expected[2]), "float64")
