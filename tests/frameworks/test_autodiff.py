"""Gradients through the frameworks' autodiff, against the native losses and the float64 reference.

torch: autograd for every option (values, gradients with respect to the
logits and to probability targets, reduction "none" with a random upstream
gradient), double backward (Hessian-vector products), low precision and
``torch.compile(fullgraph=True)``; against ``F.cross_entropy``/``F.nll_loss``.

JAX: ``jax.grad``, ``jit``, ``vmap``, ``jax.hessian`` and ``jax.jvp``; against
optax where it has the options and the reference written in ``jax.numpy``
(:mod:`_reference` with ``xp=jnp``) for every option, and the complex-step
gradient of the NumPy reference.

These tests run only when their backend is selected (fixtures ``torch_backend``
and ``jax_backend`` skip otherwise).
"""

from __future__ import annotations

import _reference as ref
import numpy as np
import pytest
from _cases import KINDS, OPTIONS, REDUCTIONS, applies, assert_close, assert_result, make_case

import multixent

SECOND_ORDER_OPTIONS = ["plain", "weight-ignore-smoothing", "z_loss", "softcap", "all"]


def _case(option, kind, layout="kdim-axis1", seed=0):
    if not applies(option, kind):
        pytest.skip("ignore_index applies to class indices only")
    return make_case(layout, kind, option, seed=seed)


def _upstream(case, reduction, seed=1):
    if reduction != "none":
        return None
    shape = ref.cross_entropy(case.x, case.target, reduction="none", **case.options).shape
    return np.random.default_rng(seed).normal(size=shape)


# ==========================================================================
# torch


def _torch_run(tb, fn, x, t, kw, reduction, u, *, target_grad, create_graph=False):
    """``(loss, [∂/∂x, ∂/∂t])`` of ``fn`` (a cross-entropy) through autograd."""
    torch = tb.modules["torch"]
    xr = x.detach().clone().requires_grad_()
    tr = t.detach().clone().requires_grad_() if target_grad else t
    loss = fn(xr, tr, reduction=reduction, **kw)
    out = loss if u is None else (loss * u).sum()
    inputs = [xr, tr] if target_grad else [xr]
    grads = torch.autograd.grad(out, inputs, create_graph=create_graph)
    return loss, grads, inputs


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["2d", "kdim-axis1", "unbatched"])
def test_torch_autograd(torch_backend, layout, kind, option, reduction):
    tb = torch_backend
    case = _case(option, kind, layout)
    x, t, kw = case.on(tb)
    u = _upstream(case, reduction)
    ub = None if u is None else tb.asarray(u)
    probs = kind == "probs"
    loss, grads, _ = _torch_run(tb, multixent.cross_entropy, x, t, kw, reduction, ub, target_grad=probs)
    assert_result(tb, loss, ref.cross_entropy(case.x, case.target, reduction=reduction, **case.options), "float64")
    if not (case.none_counted and reduction == "mean"):  # torch's NaN there is the deliberate difference
        native, native_grads, _ = _torch_run(tb, tb.native.cross_entropy, x, t, kw, reduction, ub, target_grad=probs)
        assert_close(tb, loss, tb.to_numpy(native))
        assert_close(tb, grads[0], tb.to_numpy(native_grads[0]))
    assert_close(
        tb, grads[0], ref.cross_entropy_grad(case.x, case.target, upstream=u, reduction=reduction, **case.options)
    )
    if probs:
        assert_result(tb, grads[1], tb.to_numpy(native_grads[1]), "float64")
        want_t = ref.cross_entropy_target_grad(case.x, case.target, upstream=u, reduction=reduction, **case.options)
        assert_close(tb, grads[1], want_t)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", SECOND_ORDER_OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_double_backward(torch_backend, kind, option, reduction):
    """Hessian-vector products (and the mixed logits/target second derivative) equal the native ones."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, kind)
    x, t, kw = case.on(tb)
    u = _upstream(case, reduction)
    ub = None if u is None else tb.asarray(u)
    v = tb.asarray(np.random.default_rng(2).normal(size=case.x.shape))
    probs = kind == "probs"
    hvps = []
    for fn in (multixent.cross_entropy, tb.native.cross_entropy):
        _, grads, inputs = _torch_run(tb, fn, x, t, kw, reduction, ub, target_grad=probs, create_graph=True)
        hvps.append(torch.autograd.grad((grads[0] * v).sum(), inputs))
    for got, want in zip(*hvps, strict=True):
        assert_close(tb, got, tb.to_numpy(want))


def test_torch_gradgradcheck(torch_backend):
    """torch's own finite-difference checks of the first and second derivatives (float64)."""
    torch = torch_backend.modules["torch"]
    case = make_case("2d", "index", "all", seed=3)
    x, t, kw = case.on(torch_backend)
    x.requires_grad_()

    def f(x):
        return multixent.cross_entropy(x, t, reduction="none", **kw)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    p = torch_backend.asarray(make_case("2d", "probs", "plain", seed=3).target).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, p: multixent.cross_entropy(x, p, softcap=2.0, z_loss=0.1), (x, p))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_torch_autograd_low_precision(torch_backend, dtype, kind):
    """Gradients in the logits' dtype, within a few eps of the exact gradient of the stored inputs."""
    tb = torch_backend
    case = make_case("kdim-axis1", kind, "all" if kind == "index" else "z_loss", seed=4)
    x, t, kw = case.on(tb, dtype)
    exact = case.quantized(tb, dtype)
    loss, grads, _ = _torch_run(tb, multixent.cross_entropy, x, t, kw, "mean", None, target_grad=kind == "probs")
    assert_result(tb, loss, ref.cross_entropy(exact.x, exact.target, **exact.options), dtype)
    assert_result(tb, grads[0], ref.cross_entropy_grad(exact.x, exact.target, **exact.options), dtype)
    if kind == "probs":
        assert_result(tb, grads[1], ref.cross_entropy_target_grad(exact.x, exact.target, **exact.options), dtype)


def test_torch_only_target_requires_grad_and_no_grad(torch_backend):
    tb = torch_backend
    torch = tb.modules["torch"]
    case = make_case("2d", "probs", "smoothing", seed=5)
    x, t, kw = case.on(tb)
    tr = t.clone().requires_grad_()
    loss = multixent.cross_entropy(x, tr, **kw)
    (g,) = torch.autograd.grad(loss, tr)
    assert_close(tb, g, ref.cross_entropy_target_grad(case.x, case.target, **case.options))
    with torch.no_grad():
        value = multixent.cross_entropy(x.clone().requires_grad_(), tr, **kw)
    assert not value.requires_grad
    assert_close(tb, value, tb.to_numpy(loss.detach()))
    # cross_entropy_and_grad with a recorded target (and weight) under grad mode: same loss, differentiable
    w = torch.ones(case.x.shape[-1], dtype=x.dtype, requires_grad=True)
    value, grad = multixent.cross_entropy_and_grad(x, tr, **{**kw, "weight": w})
    assert value.requires_grad
    assert_close(tb, value, tb.to_numpy(loss.detach()))
    assert_close(tb, grad, ref.cross_entropy_grad(case.x, case.target, **case.options))
    (g,) = torch.autograd.grad(value, tr)
    assert_close(tb, g, ref.cross_entropy_target_grad(case.x, case.target, **case.options))


@pytest.mark.parametrize("option", ["plain", "weight-ignore-smoothing", "softcap", "all"])
def test_torch_retained_graph_and_upstreams(torch_backend, option):
    """A recorded "mean" (its gradient computed in the forward): backward twice through a retained
    graph, with upstream 3 then 1, accumulates ``4·∂loss/∂x`` in ``.grad``; a third call through
    ``autograd.grad`` with ``create_graph=True`` differentiates again. Against ``F.cross_entropy``."""
    tb = torch_backend
    torch = tb.modules["torch"]
    case = _case(option, "index", "2d", seed=6)
    x, t, kw = case.on(tb)
    _, (want,), _ = _torch_run(tb, tb.native.cross_entropy, x, t, kw, "mean", None, target_grad=False)
    xr = x.detach().clone().requires_grad_()
    loss = multixent.cross_entropy(xr, t, **kw)
    (3 * loss).backward(retain_graph=True)
    assert_close(tb, xr.grad, 3 * tb.to_numpy(want))
    loss.backward(retain_graph=True)
    assert_close(tb, xr.grad, 4 * tb.to_numpy(want))
    (g,) = torch.autograd.grad(loss, xr, create_graph=True)
    assert g.requires_grad
    assert_close(tb, g, tb.to_numpy(want))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore-class1", "weight-ignore-smoothing"])
def test_torch_nll_loss_autograd(torch_backend, option, reduction):
    tb = torch_backend
    torch = tb.modules["torch"]
    case = make_case("kdim-axis1", "index", option, seed=6)
    case.options.pop("label_smoothing", None)
    x, t, kw = case.on(tb)
    u = _upstream(case, reduction)
    results = []
    for fn in (multixent.nll_loss, tb.native.nll_loss):
        xr = torch.log_softmax(x, dim=1).detach().requires_grad_()
        loss = fn(xr, t, reduction=reduction, **kw)
        out = loss if u is None else (loss * tb.asarray(u)).sum()
        results.append((loss, torch.autograd.grad(out, xr)[0]))
    assert_close(tb, results[0][0], tb.to_numpy(results[1][0].detach()))
    assert_close(tb, results[0][1], tb.to_numpy(results[1][1]))


def test_torch_log_softmax_logsumexp_autograd(torch_backend):
    tb = torch_backend
    torch = tb.modules["torch"]
    x = tb.asarray(np.random.default_rng(7).normal(size=(3, 5, 4)))
    v = tb.asarray(np.random.default_rng(8).normal(size=(3, 5, 4)))
    for got_fn, native_fn in [
        (lambda z: multixent.log_softmax(z, axis=1) * v, lambda z: tb.native.log_softmax(z, 1) * v),
        (lambda z: multixent.logsumexp(z, axis=1) ** 2, lambda z: tb.native.logsumexp(z, 1) ** 2),
    ]:
        grads = []
        for fn in (got_fn, native_fn):
            xr = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
            (h,) = torch.autograd.grad((g * v).sum(), xr)
            grads.append((g.detach(), h))
        assert_close(tb, grads[0][0], tb.to_numpy(grads[1][0]))
        assert_close(tb, grads[0][1], tb.to_numpy(grads[1][1]))


# torch.compile: few tests (each compilation costs seconds)


def _compiled_matches_native(tb, case, reduction, backend, dtype="float32"):
    torch = tb.modules["torch"]
    x, t, kw = case.on(tb, dtype)
    u = _upstream(case, reduction)
    ub = None if u is None else tb.asarray(u, dtype)
    probs = not np.issubdtype(case.target.dtype, np.integer)

    def loss_fn(fn):
        def run(x, t):
            loss = fn(x, t, reduction=reduction, **kw)
            return loss if ub is None else (loss * ub).sum()

        return run

    compiled = torch.compile(loss_fn(multixent.cross_entropy), fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, loss_fn(tb.native.cross_entropy)):
        xr = x.clone().requires_grad_()
        tr = t.clone().requires_grad_() if probs else t
        out = fn(xr, tr)
        results.append((out.detach(), torch.autograd.grad(out, [xr, tr] if probs else [xr])))
    (got, got_grads), (want, want_grads) = results
    assert_close(tb, got, tb.to_numpy(want), dtype)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(tb, g, tb.to_numpy(w), dtype)
    return compiled, x, t


def test_torch_compile_index_targets(torch_backend):
    """fullgraph aot_eager (forward and backward traced) with every option; out-of-range index -> NaN."""
    tb = torch_backend
    case = make_case("kdim-axis1", "index", "all", seed=9)
    compiled, x, _t = _compiled_matches_native(tb, case, "mean", "aot_eager")
    # the same graph (same shapes) with an out-of-range class: no eager check, NaN instead
    bad = case.target.copy()
    bad[0, 1] = case.x.shape[1] + 2  # C + 2
    got = compiled(x, tb.asarray(bad))
    assert np.isnan(tb.to_numpy(got))


def test_torch_compile_probability_targets_none(torch_backend):
    tb = torch_backend
    case = make_case("2d", "probs", "smoothing", seed=10)
    case.options.update(z_loss=0.1, softcap=3.0, weight=np.linspace(0.5, 1.5, 5))
    _compiled_matches_native(tb, case, "none", "aot_eager")


def test_torch_compile_inductor(torch_backend):
    """The default (Inductor) compiler, fullgraph: values and gradients."""
    tb = torch_backend
    case = make_case("2d", "index", "weight-ignore-smoothing", seed=11)
    case.options.update(z_loss=0.05)
    _compiled_matches_native(tb, case, "mean", "inductor")


# ==========================================================================
# JAX


@pytest.fixture(scope="module")
def jx(jax_backend):
    """(jax, jax.numpy, backend)."""
    import jax.numpy as jnp

    return jax_backend.modules["jax"], jnp, jax_backend


def _jax_losses(jnp, case, jb, reduction, dtype="float64"):
    """(multixent loss, jnp reference loss, optax loss or None) as functions of (x, t), and the inputs."""
    x, t, kw = case.on(jb, dtype)

    def mx(x, t):
        return multixent.cross_entropy(x, t, reduction=reduction, **kw)

    def reference(x, t):
        return ref.cross_entropy(x, t, reduction=reduction, xp=jnp, **kw)

    native = None
    if jb.native.cross_entropy(x, t, reduction=reduction, **kw) is not None:

        def native(x, t):
            return jb.native.cross_entropy(x, t, reduction=reduction, **kw)

    return mx, reference, native, x, t


def _scalar(fn, u):
    return fn if u is None else (lambda x, t: (fn(x, t) * u).sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_jax_grad(jx, kind, option, reduction):
    jax, jnp, jb = jx
    case = _case(option, kind)
    mx, reference, native, x, t = _jax_losses(jnp, case, jb, reduction)
    u = _upstream(case, reduction)
    ub = None if u is None else jb.asarray(u)
    argnums = (0, 1) if kind == "probs" else 0
    value, grads = jax.value_and_grad(_scalar(mx, ub), argnums=argnums)(x, t)
    grads = grads if kind == "probs" else (grads,)

    def oracle_grad(fn):  # jit (cheaper than eager for oracles), closing over class indices (optax reads them)
        if kind == "probs":
            return jax.jit(jax.grad(_scalar(fn, ub), argnums=argnums))(x, t)
        return jax.jit(jax.grad(lambda z: _scalar(fn, ub)(z, t)))(x)

    oracles = [oracle_grad(reference)]
    if native is not None:
        oracles.append(oracle_grad(native))
        assert_close(jb, value, jb.to_numpy(_scalar(native, ub)(x, t)))
    for want in oracles:
        want = want if kind == "probs" else (want,)
        for g, w in zip(grads, want, strict=True):
            assert_result(jb, g, jb.to_numpy(w), "float64")
    # and the complex-step gradient of the NumPy reference
    assert_close(
        jb, grads[0], ref.cross_entropy_grad(case.x, case.target, upstream=u, reduction=reduction, **case.options)
    )


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_jax_jit(jx, kind, option):
    """jit of the loss, of value_and_grad and of cross_entropy_and_grad: the eager reference's values."""
    jax, jnp, jb = jx
    case = _case(option, kind)
    if kind == "probs":
        case.options.update(label_smoothing=0.1, z_loss=0.1, softcap=2.0)
    mx, _reference, _, x, t = _jax_losses(jnp, case, jb, "mean")
    want = ref.cross_entropy(case.x, case.target, **case.options)
    want_grad = ref.cross_entropy_grad(case.x, case.target, **case.options)
    assert_close(jb, jax.jit(mx)(x, t), want)
    value, grad = jax.jit(jax.value_and_grad(mx))(x, t)
    assert_close(jb, value, want)
    assert_close(jb, grad, want_grad)
    _, _, kw = case.on(jb)
    loss, grad = jax.jit(lambda x, t: multixent.cross_entropy_and_grad(x, t, **kw))(x, t)
    assert_close(jb, loss, want)
    assert_close(jb, grad, want_grad)
    per = jax.jit(lambda x, t: multixent.cross_entropy(x, t, reduction="none", **kw))(x, t)
    assert_close(jb, per, ref.cross_entropy(case.x, case.target, reduction="none", **case.options))


@pytest.mark.parametrize("kind", KINDS)
def test_jax_vmap(jx, kind):
    """vmap over a batch of problems (and jit of vmap of grad): each problem's own loss and gradient."""
    jax, _jnp, jb = jx
    cases = [make_case("2d", kind, "all" if kind == "index" else "smoothing", seed=s) for s in range(3)]
    weight = np.linspace(0.5, 1.5, 5)
    for c in cases:
        c.options.update(z_loss=0.1, weight=weight)
    options = {k: v for k, v in cases[0].options.items() if k != "weight"}
    w = jb.asarray(weight)

    def loss(x, t, reduction="mean"):
        return multixent.cross_entropy(x, t, weight=w, reduction=reduction, **options)

    per_problem = np.array([ref.cross_entropy(c.x, c.target, **c.options) for c in cases])
    grads = np.stack([ref.cross_entropy_grad(c.x, c.target, **c.options) for c in cases])
    xs, ts = jb.asarray(np.stack([c.x for c in cases])), jb.asarray(np.stack([c.target for c in cases]))
    assert_close(jb, jax.vmap(loss)(xs, ts), per_problem)
    assert_close(jb, jax.vmap(jax.grad(loss))(xs, ts), grads)
    assert_close(jb, jax.jit(jax.vmap(jax.grad(loss)))(xs, ts), grads)
    # vmap over the rows of one problem: unbatched calls give the per-row losses
    c = cases[0]
    rows = jax.vmap(lambda x, t: loss(x, t, "sum"))(jb.asarray(c.x), jb.asarray(c.target))
    assert_close(jb, rows, ref.cross_entropy(c.x, c.target, reduction="none", **c.options))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", SECOND_ORDER_OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_jax_hessian(jx, kind, option, reduction):
    jax, jnp, jb = jx
    case = _case(option, kind, layout="2d")
    case.x, case.target = case.x[:3], case.target[:3]
    mx, reference, native, x, t = _jax_losses(jnp, case, jb, reduction)
    u = _upstream(case, reduction)
    ub = None if u is None else jb.asarray(u)
    got = jax.jit(jax.hessian(_scalar(mx, ub)))(x, t)
    assert_result(jb, got, jb.to_numpy(jax.jit(jax.hessian(_scalar(reference, ub)))(x, t)), "float64")
    if native is not None:
        native_hessian = jax.jit(jax.hessian(lambda x: _scalar(native, ub)(x, t)))  # t concrete: optax's check
        assert_close(jb, got, jb.to_numpy(native_hessian(x)))
    if kind == "probs":  # the mixed second derivative ∂²/∂x∂t
        mixed = jax.jit(jax.jacfwd(jax.grad(_scalar(mx, ub), argnums=0), argnums=1))(x, t)
        want = jax.jit(jax.jacfwd(jax.grad(_scalar(reference, ub), argnums=0), argnums=1))(x, t)
        assert_close(jb, mixed, jb.to_numpy(want))


@pytest.mark.parametrize("option", SECOND_ORDER_OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_jax_jvp(jx, kind, option):
    """Forward mode: jvp of the per-position losses, with respect to the logits (and the target)."""
    jax, jnp, jb = jx
    case = _case(option, kind)
    mx, reference, native, x, t = _jax_losses(jnp, case, jb, "none")
    rng = np.random.default_rng(12)
    dx = jb.asarray(rng.normal(size=case.x.shape))
    dt = jb.asarray(rng.normal(size=case.x.shape)) if kind == "probs" else None
    oracles = [reference] + ([native] if native is not None else [])

    def jvp(fn):
        if kind == "probs":
            return jax.jvp(fn, (x, t), (dx, dt))
        return jax.jvp(lambda z: fn(z, t), (x,), (dx,))

    value, tangent = jvp(mx)
    for fn in oracles:
        want_value, want_tangent = jvp(fn)
        assert_close(jb, value, jb.to_numpy(want_value))
        assert_close(jb, tangent, jb.to_numpy(want_tangent))
    # under jit too
    value_jit, tangent_jit = jax.jit(lambda: jvp(mx))()
    assert_close(jb, value_jit, jb.to_numpy(value))
    assert_close(jb, tangent_jit, jb.to_numpy(tangent))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_jax_grad_low_precision(jx, dtype, kind):
    jax, jnp, jb = jx
    case = make_case("kdim-axis1", kind, "all" if kind == "index" else "z_loss", seed=13)
    mx, _, _, x, t = _jax_losses(jnp, case, jb, "mean", dtype)
    exact = case.quantized(jb, dtype)
    value, grad = jax.value_and_grad(mx)(x, t)
    assert_result(jb, value, ref.cross_entropy(exact.x, exact.target, **exact.options), dtype)
    assert_result(jb, grad, ref.cross_entropy_grad(exact.x, exact.target, **exact.options), dtype)
    grad_jit = jax.jit(jax.grad(mx))(x, t)
    assert_result(jb, grad_jit, ref.cross_entropy_grad(exact.x, exact.target, **exact.options), dtype)


def test_jax_nll_log_softmax_logsumexp_grads(jx):
    jax, jnp, jb = jx
    case = make_case("kdim-axis1", "index", "weight-ignore-smoothing", seed=14)
    case.options.pop("label_smoothing")
    x, t, kw = case.on(jb)
    lp = jax.nn.log_softmax(x, axis=1)
    got = jax.grad(lambda p: multixent.nll_loss(p, t, **kw))(lp)
    want = jax.grad(lambda p: ref.nll_loss(p, t, xp=jnp, **kw))(lp)
    assert_close(jb, got, jb.to_numpy(want))
    v = jb.asarray(np.random.default_rng(15).normal(size=case.x.shape))
    small, v_small = x[:1, :, :2], v[:1, :, :2]
    for mine, native in [
        (
            lambda z, v: jnp.sum(multixent.log_softmax(z, axis=1) * v),
            lambda z, v: jnp.sum(jax.nn.log_softmax(z, 1) * v),
        ),
        (lambda z, v: jnp.sum(multixent.logsumexp(z, axis=1) ** 2), lambda z, v: jnp.sum(jax.nn.logsumexp(z, 1) ** 2)),
    ]:
        assert_close(jb, jax.grad(mine)(x, v), jb.to_numpy(jax.grad(native)(x, v)))
        want = jax.hessian(native)(small, v_small)
        assert_close(jb, jax.jit(jax.hessian(mine))(small, v_small), jb.to_numpy(want))
