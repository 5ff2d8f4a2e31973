"""Every bad input raises the stated error on every backend, naming the argument; nothing is modified."""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
from conftest import SELECTED, make_backend

import multixent

RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, 3))  # 4 rows, C = 3
Y = np.array([0, 2, 1, 2])
P = np.full((4, 3), 1 / 3)
W = np.array([1.0, 2.0, 0.5])

# name -> (function, logits, target, options, error, regex the message must match)
CASES = {
    "int-logits": ("cross_entropy", X.astype(np.int64), Y, {}, TypeError, r"logits.*floating"),
    "bool-logits": ("cross_entropy", X > 0, Y, {}, TypeError, r"logits.*floating"),
    "bool-target": ("cross_entropy", X, Y > 0, {}, TypeError, r"target.*(integer|indices)"),
    "reduction": ("cross_entropy", X, Y, {"reduction": "avg"}, ValueError, r"reduction.*'avg'"),
    "reduction-none-for-grad": ("cross_entropy_and_grad", X, Y, {"reduction": "none"}, ValueError, r"reduction"),
    "label_smoothing-negative": ("cross_entropy", X, Y, {"label_smoothing": -0.1}, ValueError, r"label_smoothing"),
    "label_smoothing-above-1": ("cross_entropy", X, Y, {"label_smoothing": 1.5}, ValueError, r"label_smoothing"),
    "z_loss-negative": ("cross_entropy", X, Y, {"z_loss": -1.0}, ValueError, r"z_loss"),
    "softcap-zero": ("cross_entropy", X, Y, {"softcap": 0.0}, ValueError, r"softcap"),
    "weight-length": ("cross_entropy", X, Y, {"weight": np.ones(4)}, ValueError, r"weight.*\(3,\).*\(4,\)"),
    "weight-2d": ("cross_entropy", X, Y, {"weight": np.ones((1, 3))}, ValueError, r"weight.*\(1, 3\)"),
    "ignore_index-with-probs": ("cross_entropy", X, P, {"ignore_index": 1}, ValueError, r"ignore_index"),
    "axis-too-large": ("cross_entropy", X, Y, {"axis": 2}, ValueError, r"axis"),
    "axis-too-small": ("cross_entropy", X, Y, {"axis": -3}, ValueError, r"axis"),
    "zero-classes": ("cross_entropy", np.zeros((4, 0)), Y, {}, ValueError, r"zero classes"),
    "index-target-shape": ("cross_entropy", X, Y[:3], {}, ValueError, r"target.*\(3,\).*\(4, 3\)"),
    "index-target-shape-axis0": ("cross_entropy", X, Y, {"axis": 0}, ValueError, r"target.*\(4,\).*\(4, 3\)"),
    "probs-target-shape": ("cross_entropy", X, P[:, :2], {}, ValueError, r"target.*\(4, 2\).*\(4, 3\)"),
    "probs-no-broadcast": ("cross_entropy", X, P[:1], {}, ValueError, r"target.*\(1, 3\).*\(4, 3\)"),
    "index-too-large": ("cross_entropy", X, np.array([0, 3, 1, 2]), {}, IndexError, r"\b3\b.*\b3\b"),
    "index-negative": ("cross_entropy", X, np.array([0, 1, -1, 2]), {}, IndexError, r"-1\b.*\b3\b"),
    "index-far-out": ("cross_entropy", X, np.array([0, 1, 2, 1000]), {}, IndexError, r"1000\b.*\b3\b"),
    "index-not-the-ignore_index": (
        "cross_entropy",
        X,
        np.array([0, -100, 1, 2]),
        {"ignore_index": -1},
        IndexError,
        r"-100\b.*\b3\b",
    ),
    "index-with-grad": ("cross_entropy_and_grad", X, np.array([5, 1, 1, 2]), {}, IndexError, r"\b5\b.*\b3\b"),
    "nll-int-log_probs": ("nll_loss", X.astype(np.int32), Y, {}, TypeError, r"log_probs.*floating"),
    "nll-probability-target": ("nll_loss", X, P, {}, TypeError, r"nll_loss.*integer"),
    "nll-index-too-large": ("nll_loss", X, np.array([0, 1, 7, 2]), {}, IndexError, r"\b7\b.*\b3\b"),
    "nll-weight-length": ("nll_loss", X, Y, {"weight": np.ones(2)}, ValueError, r"weight"),
    "nll-reduction": ("nll_loss", X, Y, {"reduction": "mean "}, ValueError, r"reduction"),
}


def _args(backend, logits, target, options):
    """Backend copies of the inputs and the NumPy originals to compare with after the call."""
    arrays = {"logits": logits, "target": target}
    if isinstance(options.get("weight"), np.ndarray):
        arrays["weight"] = options["weight"]
    on = {k: backend.asarray(v) for k, v in arrays.items()}
    kw = {**options, **({"weight": on["weight"]} if "weight" in on else {})}
    return on, kw, {k: v.copy() for k, v in arrays.items()}


def _unchanged(backend, on, originals):
    for k, a in on.items():
        np.testing.assert_array_equal(backend.to_numpy(a), originals[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(backend, case):
    name, logits, target, options, error, message = CASES[case]
    on, kw, originals = _args(backend, logits, target, options)
    with pytest.raises(error, match=message):
        getattr(multixent, name)(on["logits"], on["target"], **kw)
    _unchanged(backend, on, originals)


@pytest.mark.parametrize(
    ("name", "x", "options", "error", "message"),
    [
        ("logsumexp", X.astype(np.int64), {}, TypeError, r"\bx\b.*floating"),
        ("logsumexp", X, {"axis": 2}, ValueError, r"axis"),
        ("log_softmax", X > 0, {}, TypeError, r"\bx\b.*floating"),
        ("log_softmax", X, {"axis": -3}, ValueError, r"axis"),
    ],
)
def test_bad_input_log_functions(backend, name, x, options, error, message):
    xb = backend.asarray(x)
    with pytest.raises(error, match=message):
        getattr(multixent, name)(xb, **options)
    np.testing.assert_array_equal(backend.to_numpy(xb), x)


def test_axis_must_be_an_int(backend):
    with pytest.raises(TypeError, match="axis"):
        multixent.cross_entropy(backend.asarray(X), backend.asarray(Y), axis=1.0)


def test_index_error_in_kdim_target_names_value_and_classes(backend):
    x = RNG.normal(size=(2, 5, 3))  # axis=1: C = 5
    y = np.array([[0, 4, 1], [2, 5, 3]])
    with pytest.raises(IndexError, match=r"\b5\b.*\b5\b"):
        multixent.cross_entropy(backend.asarray(x), backend.asarray(y), axis=1)


def test_ignore_index_may_lie_outside_the_classes(backend):
    """ignore_index=-1 or 7 (out of [0, C)) marks positions to ignore, not an IndexError."""
    for ignore in (-1, 7):
        y = np.array([0, ignore, 1, 2])
        got = multixent.cross_entropy(backend.asarray(X), backend.asarray(y), ignore_index=ignore)
        np.testing.assert_allclose(backend.to_numpy(got), ref.cross_entropy(X, y, ignore_index=ignore), rtol=1e-13)


@pytest.mark.parametrize("y", [[0, 2, 1, 2], [0, 1, 1, 0]], ids=["present", "absent"])
def test_ignore_index_inside_the_classes(backend, y):
    """ignore_index=2 (a class) ignores the positions holding 2, whether or not there are any."""
    y = np.array(y)
    for reduction in ("none", "mean"):
        got = multixent.cross_entropy(backend.asarray(X), backend.asarray(y), ignore_index=2, reduction=reduction)
        want = ref.cross_entropy(X, y, ignore_index=2, reduction=reduction)
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-13)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_inputs_not_modified(backend, kind, reduction):
    """A successful call (with every option) leaves logits, target and weight as they were."""
    x = RNG.normal(size=(3, 4, 5))
    if kind == "index":
        t = np.array([[0, 1, -100, 3, 2], [2, 2, 1, -100, 0], [3, 0, 0, 1, 1]])
    else:
        t = RNG.dirichlet(np.ones(4), size=(3, 5)).transpose(0, 2, 1).copy()
    w = np.array([1.0, 0.5, 2.0, 1.5])
    options = {"axis": 1, "weight": w, "label_smoothing": 0.1, "z_loss": 0.1, "softcap": 2.0}
    on, kw, originals = _args(backend, x, t, options)
    multixent.cross_entropy(on["logits"], on["target"], reduction=reduction, **kw)
    if reduction != "none":
        multixent.cross_entropy_and_grad(on["logits"], on["target"], reduction=reduction, **kw)
    if kind == "index":
        multixent.nll_loss(on["logits"], on["target"], reduction=reduction, axis=1, weight=kw["weight"])
    multixent.log_softmax(on["logits"], axis=1)
    multixent.logsumexp(on["logits"], axis=1)
    _unchanged(backend, on, originals)


def _other_libraries(backend):
    """Libraries to mix with ``backend``: NumPy (except for JAX, which takes NumPy arrays: test_habits.py),
    and every other selected backend."""
    others = [] if backend.name in ("numpy", "jax") else ["numpy"]
    return others + [b for b in SELECTED if b not in (backend.name, "numpy")]


@pytest.mark.parametrize("position", ["target", "weight", "logits"])
def test_mixed_libraries(backend, position):
    others = _other_libraries(backend)
    if not others:
        pytest.skip("only one array library selected")
    for other_name in others:
        if position == "logits" and (other_name, backend.name) == ("jax", "numpy"):
            continue  # JAX logits take NumPy arrays beside them (test_habits.py)
        other = make_backend(other_name)
        arrays = {"logits": backend.asarray(X), "target": backend.asarray(Y), "weight": backend.asarray(W)}
        arrays[position] = other.asarray({"logits": X, "target": Y, "weight": W}[position])
        with pytest.raises(TypeError, match="one array library"):
            multixent.cross_entropy(arrays["logits"], arrays["target"], weight=arrays["weight"])
        with pytest.raises(TypeError, match="one array library"):
            multixent.cross_entropy_and_grad(arrays["logits"], arrays["target"], weight=arrays["weight"])


# --------------------------------------------------------------------------
# Under tracing the index check cannot run: the position's loss is NaN


def test_jax_jit_out_of_range_index_is_nan(jax_backend):
    jax = jax_backend.modules["jax"]
    x, y = jax_backend.asarray(X), jax_backend.asarray(np.array([0, 3, -100, -1]))

    @jax.jit
    def per_position(x, y):
        return multixent.cross_entropy(x, y, reduction="none")

    got = jax_backend.to_numpy(per_position(x, y))
    assert np.isnan(got[1]) and np.isnan(got[3])
    assert got[2] == 0.0
    np.testing.assert_allclose(got[0], ref.cross_entropy(X[:1], np.array([0]), reduction="none")[0], rtol=1e-13)
    for reduction in ("mean", "sum"):
        total = jax.jit(lambda x, y, r=reduction: multixent.cross_entropy(x, y, reduction=r))(x, y)
        assert np.isnan(jax_backend.to_numpy(total))
    grad = jax.jit(jax.grad(lambda x, y: multixent.cross_entropy(x, y)))(x, y)
    assert np.all(np.isnan(jax_backend.to_numpy(grad)[[1, 3]]))
    # nll_loss and cross_entropy_and_grad too
    assert np.isnan(jax_backend.to_numpy(jax.jit(lambda x, y: multixent.nll_loss(x, y))(x, y)))
    loss, g = jax.jit(lambda x, y: multixent.cross_entropy_and_grad(x, y))(x, y)
    assert np.isnan(jax_backend.to_numpy(loss)) and np.all(np.isnan(jax_backend.to_numpy(g)[[1, 3]]))


def test_jax_jit_in_range_no_error(jax_backend):
    """Under jit, the checks on values are skipped without a tracer-to-bool error."""
    jax = jax_backend.modules["jax"]
    x, y = jax_backend.asarray(X), jax_backend.asarray(np.array([0, 2, -100, 1]))
    got = jax.jit(lambda x, y: multixent.cross_entropy(x, y, label_smoothing=0.1))(x, y)
    np.testing.assert_allclose(
        jax_backend.to_numpy(got), ref.cross_entropy(X, np.array([0, 2, -100, 1]), label_smoothing=0.1), rtol=1e-13
    )


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_inputs_not_modified_by_gradients(backend, kind):
    """Gradients (cross_entropy_and_grad, the framework's autodiff) leave the inputs as they were, in every dtype."""
    x = RNG.normal(size=(6, 5)) * 3
    t = np.array([0, 4, -100, 3, 2, 1]) if kind == "index" else RNG.dirichlet(np.ones(5), size=6)
    w = np.linspace(0.5, 2.0, 5)
    for dtype in backend.dtypes:
        xb = backend.asarray(x, dtype)
        tb = backend.asarray(t, None if kind == "index" else dtype)
        wb = backend.asarray(w, dtype)
        before = [backend.to_numpy(a) for a in (xb, tb, wb)]
        options = {"weight": wb, "label_smoothing": 0.1, "z_loss": 0.1}
        multixent.cross_entropy_and_grad(xb, tb, **options)
        multixent.cross_entropy_and_grad(xb, tb, softcap=3.0, **options)
        if backend.name == "torch":  # backward through the leaf itself
            torch = backend.modules["torch"]
            leaf = xb.requires_grad_(True)
            multixent.cross_entropy(leaf, tb, reduction="none", **options).sum().backward()
            torch.autograd.grad(multixent.cross_entropy(leaf, tb, **options), leaf)
            xb = leaf.detach()
        elif backend.autodiff is not None:
            backend.autodiff(lambda z, tb=tb, options=options: multixent.cross_entropy(z, tb, **options), xb)
        for a, b in zip((xb, tb, wb), before, strict=True):
            np.testing.assert_array_equal(backend.to_numpy(a), b)


def test_index_error_while_differentiating(backend):
    """The logits being traced by autodiff does not skip the check on a concrete target."""
    if backend.autodiff is None:
        pytest.skip("no autodiff")
    t = backend.asarray(np.array([0, 1, 5, 2]))
    with pytest.raises(IndexError, match=r"\b5\b.*\b3\b"):
        backend.autodiff(lambda z: multixent.cross_entropy(z, t), backend.asarray(X))


def test_jax_vmap_over_targets_out_of_range_is_nan(jax_backend):
    """A target traced by vmap: the bad position's loss is NaN, the others as usual."""
    jax = jax_backend.modules["jax"]
    y = np.array([[0, 1, 2, 1], [0, 3, 1, 2]])
    got = jax.vmap(lambda x, t: multixent.cross_entropy(x, t, reduction="none"))(
        jax_backend.asarray(np.stack([X, X])), jax_backend.asarray(y)
    )
    got = jax_backend.to_numpy(got)
    assert np.isnan(got[1, 1])
    np.testing.assert_allclose(got[0], ref.cross_entropy(X, y[0], reduction="none"), rtol=1e-13)
    valid = [0, 2, 3]
    np.testing.assert_allclose(got[1, valid], ref.cross_entropy(X[valid], y[1, valid], reduction="none"), rtol=1e-13)
