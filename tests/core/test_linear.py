"""linear_cross_entropy: values and gradients equal the naive ``cross_entropy(h @ W.T + b, y)``.

Every option, every reduction and chunk sizes 1, a non-divisor of N and N, on
NumPy and array-api-strict (values against a float64 oracle), torch (values and
gradients against torch autograd through ``F.cross_entropy``, float64) and JAX
(against ``jax.grad`` of a naive ``jnp`` loss and optax, float64). Framework
tests run only when their backend is selected by ``MULTIXENT_BACKENDS`` (a
comma-separated list; unset means all) and skip when the framework is missing.
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import multixent

_SELECTED = os.environ.get("MULTIXENT_BACKENDS", "")


def _backend(name: str) -> pytest.MarkDecorator:
    """Skip unless ``name`` is selected (MULTIXENT_BACKENDS unset selects all)."""
    chosen = {b.strip() for b in _SELECTED.split(",") if b.strip()}
    return pytest.mark.skipif(bool(chosen) and name not in chosen, reason=f"backend {name} not selected")


numpy_only = _backend("numpy")
strict_only = _backend("array-api-strict")
torch_only = _backend("torch")
jax_only = _backend("jax")

N, D, V = 11, 5, 13
CHUNKS = [1, 4, N]  # 4 does not divide 11
REDUCTIONS = ["none", "sum", "mean"]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 0.3},
    "softcap": {"softcap": 2.5},
    "all": {"weight": True, "ignore": True, "label_smoothing": 0.1, "z_loss": 0.2, "softcap": 3.0, "bias": True},
}


def _data(seed: int = 0, n: int = N, bias: bool = True) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, V, n)
    return {
        "h": rng.normal(size=(n, D)),
        "w": rng.normal(size=(V, D)),
        "b": rng.normal(size=V) if bias else None,
        "y": target,
        "y_ignored": np.where(np.arange(n) % 3 == 1, -100, target),
        "weight": rng.uniform(0.2, 2.0, V),
    }


def _kwargs(spec: dict, data: dict, to) -> dict:
    """linear_cross_entropy / cross_entropy keyword options (bias excluded)."""
    kw = {k: spec[k] for k in ("label_smoothing", "z_loss", "softcap") if k in spec}
    if spec.get("weight"):
        kw["weight"] = to(data["weight"])
    return kw


def _target(spec: dict, data: dict) -> np.ndarray:
    return data["y_ignored"] if spec.get("ignore") else data["y"]


# --------------------------------------------------------------------------
# NumPy and array-api-strict: values against a float64 oracle


def _oracle(h, w, b, y, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss of the materialised logits, written out in float64 NumPy."""
    from scipy.special import logsumexp

    x = h @ w.T + (0.0 if b is None else b)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    counted = y != -100
    yy = np.where(counted, y, 0)
    wt = np.ones(V) if weight is None else weight
    lse = logsumexp(x, axis=-1)
    logp = x - lse[:, None]
    eps = label_smoothing
    ce = -(1 - eps) * wt[yy] * logp[np.arange(len(y)), yy] - eps / V * (logp * wt).sum(-1)
    ce = np.where(counted, ce, 0.0)
    lse2 = np.where(counted, lse**2, 0.0)
    if reduction == "none":
        return ce + z_loss * lse2
    if reduction == "sum":
        return ce.sum() + z_loss * lse2.sum()
    den = (wt[yy] * counted).sum()
    n = counted.sum()
    return (ce.sum() / den if den else 0.0) + z_loss * (lse2.sum() / n if n else 0.0)


@numpy_only
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_numpy_values(option: str, reduction: str, chunk: int) -> None:
    spec, data = OPTIONS[option], _data()
    b = data["b"] if spec.get("bias") else None
    y = _target(spec, data)
    kw = _kwargs(spec, data, np.asarray)
    got = multixent.linear_cross_entropy(data["h"], data["w"], y, bias=b, chunk_size=chunk, reduction=reduction, **kw)
    want = _oracle(data["h"], data["w"], b, y, reduction=reduction, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    materialised = multixent.cross_entropy(
        data["h"] @ data["w"].T + (0 if b is None else b), y, reduction=reduction, **kw
    )
    np.testing.assert_allclose(got, materialised, rtol=1e-12, atol=1e-12)


@numpy_only
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 9),
    v=st.integers(1, 7),
    chunk=st.one_of(st.none(), st.integers(1, 12)),
    reduction=st.sampled_from(REDUCTIONS),
    smoothing=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_numpy_property(n: int, v: int, chunk: int | None, reduction: str, smoothing: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w, b = rng.normal(size=(n, 3)) * 3, rng.normal(size=(v, 3)), rng.normal(size=v)
    y = np.where(rng.random(n) < 0.3, -100, rng.integers(0, v, n))
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    got = multixent.linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, **kw)
    want = multixent.cross_entropy(h @ w.T + b, y, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@numpy_only
def test_numpy_batch_shape_and_float32() -> None:
    data = _data()
    h = np.reshape(data["h"][:10], (2, 5, D)).astype(np.float32)
    y = np.reshape(data["y"][:10], (2, 5))
    w = data["w"].astype(np.float32)
    got = multixent.linear_cross_entropy(h, w, y, reduction="none", chunk_size=3)
    assert got.shape == (2, 5) and got.dtype == np.float32
    want = _oracle(data["h"][:10], data["w"], None, data["y"][:10], reduction="none")
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-5, atol=1e-5)


@numpy_only
def test_numpy_no_rows() -> None:
    h, w, y = np.zeros((0, D)), np.ones((V, D)), np.zeros((0,), dtype=np.int64)
    assert multixent.linear_cross_entropy(h, w, y) == 0.0
    assert multixent.linear_cross_entropy(h, w, y, reduction="none").shape == (0,)


@strict_only
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_array_api_strict_values(reduction: str, chunk: int) -> None:
    xps = pytest.importorskip("array_api_strict")
    spec, data = OPTIONS["all"], _data()
    y = _target(spec, data)
    kw = _kwargs(spec, data, xps.asarray)
    h, w, b = (xps.asarray(data[k]) for k in ("h", "w", "b"))
    got = multixent.linear_cross_entropy(h, w, xps.asarray(y), bias=b, chunk_size=chunk, reduction=reduction, **kw)
    want = _oracle(data["h"], data["w"], data["b"], y, reduction=reduction, **_kwargs(spec, data, np.asarray))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# Argument errors (NumPy arrays; the checks are the same for every library)


@numpy_only
def test_shape_errors_name_both_shapes() -> None:
    h, w, y = np.zeros((4, 3)), np.zeros((6, 5)), np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(6, 5\)"):
        multixent.linear_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match=r"bias of shape \(5,\).*\(6, 3\)"):
        multixent.linear_cross_entropy(h, np.zeros((6, 3)), y, bias=np.zeros(5))
    with pytest.raises(ValueError, match=r"target of shape \(3,\).*\(4, 3\)"):
        multixent.linear_cross_entropy(h, np.zeros((6, 3)), y[:3])
    with pytest.raises(ValueError, match="classifier must have shape"):
        multixent.linear_cross_entropy(h, np.zeros((6, 3, 1)), y)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        multixent.linear_cross_entropy(h, np.zeros((6, 3)), y, weight=np.ones(5))


@numpy_only
@pytest.mark.parametrize(("chunk", "error"), [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_chunk_size_errors(chunk, error) -> None:
    h, w, y = np.zeros((4, 3)), np.zeros((6, 3)), np.zeros(4, dtype=np.int64)
    with pytest.raises(error, match="chunk_size must be a positive int or None"):
        multixent.linear_cross_entropy(h, w, y, chunk_size=chunk)


@numpy_only
def test_type_and_value_errors() -> None:
    h, w, y = np.zeros((4, 3)), np.zeros((6, 3)), np.zeros(4, dtype=np.int64)
    with pytest.raises(TypeError, match="class indices"):
        multixent.linear_cross_entropy(h, w, np.zeros(4))
    with pytest.raises(TypeError, match="classifier must have a real floating dtype"):
        multixent.linear_cross_entropy(h, w.astype(np.int64), y)
    with pytest.raises(IndexError, match="class index 6"):
        multixent.linear_cross_entropy(h, w, np.array([0, 6, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        multixent.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        multixent.linear_cross_entropy(h, w, y, label_smoothing=2.0)


# --------------------------------------------------------------------------
# torch: against torch autograd of F.cross_entropy on the materialised logits


def _torch_native(x, y, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    import torch
    import torch.nn.functional as F

    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    out = F.cross_entropy(x, y, weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    if z_loss:
        counted = y != -100
        lse2 = torch.where(counted, torch.logsumexp(x, dim=-1) ** 2, 0.0)
        if reduction == "none":
            out = out + z_loss * lse2
        elif reduction == "sum":
            out = out + z_loss * lse2.sum()
        else:
            out = out + z_loss * lse2.sum() / counted.sum().clamp(min=1)
    return out


def _torch_case(spec: dict, reduction: str, chunk: int | None, dtype=None, seed: int = 0):
    """(fused value, native value, fused grads, native grads)."""
    import torch

    dtype = dtype or torch.float64
    data = _data(seed)
    y = torch.as_tensor(_target(spec, data))
    kw = _kwargs(spec, data, lambda a: torch.as_tensor(a, dtype=torch.float64))
    leaves = {k: torch.as_tensor(data[k]) for k in ("h", "w", "b")}
    if not spec.get("bias"):
        leaves.pop("b")
    fused = {k: v.to(dtype, copy=True).requires_grad_() for k, v in leaves.items()}
    native = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    got = multixent.linear_cross_entropy(
        fused["h"], fused["w"], y, bias=fused.get("b"), chunk_size=chunk, reduction=reduction, **kw
    )
    logits = native["h"] @ native["w"].T + native.get("b", 0.0)
    want = _torch_native(logits, y, reduction=reduction, **kw)
    upstream = torch.linspace(0.5, 2.0, max(want.numel(), 1), dtype=torch.float64).reshape(want.shape)
    (got * upstream.to(got.dtype)).sum().backward()
    (want * upstream).sum().backward()
    return got, want, {k: v.grad for k, v in fused.items()}, {k: v.grad for k, v in native.items()}


@torch_only
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_values_and_grads(option: str, reduction: str, chunk: int) -> None:
    torch = pytest.importorskip("torch")
    got, want, g_got, g_want = _torch_case(OPTIONS[option], reduction, chunk)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"grad of {k}: {m}")


@torch_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_torch_blocks_inside_chunks(option: str, reduction: str, monkeypatch) -> None:
    """Blocks of 1 row inside a chunk of all rows: the in-place block path over each chunk's logits."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(multixent._blocked, "BLOCK_ELEMENTS", V // 2)
    got, want, g_got, g_want = _torch_case(OPTIONS[option], reduction, None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"grad of {k}: {m}")


@torch_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_bfloat16(reduction: str) -> None:
    torch = pytest.importorskip("torch")
    got, want, g_got, g_want = _torch_case(OPTIONS["all"], reduction, 4, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g_got.values())
    # float32 accumulation: the error is the rounding of the bf16 inputs and of the result
    torch.testing.assert_close(got.double(), want.detach(), rtol=0.05, atol=0.05)
    for k in g_want:
        torch.testing.assert_close(g_got[k].double(), g_want[k], rtol=0.05, atol=0.05)


@torch_only
def test_torch_partial_requires_grad_and_no_grad() -> None:
    torch = pytest.importorskip("torch")
    data = _data()
    h, w, y = torch.as_tensor(data["h"]), torch.as_tensor(data["w"]).requires_grad_(), torch.as_tensor(data["y"])
    loss = multixent.linear_cross_entropy(h, w, y, chunk_size=4)
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(h @ w2.T, y).backward()
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():
        value = multixent.linear_cross_entropy(h, w, y, chunk_size=4)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach())


@torch_only
def test_torch_second_backward() -> None:
    """A retained graph gives the same gradient again, for upstream 1 (loss.backward()) and others."""
    torch = pytest.importorskip("torch")
    data = _data()
    h = torch.as_tensor(data["h"]).requires_grad_()
    loss = multixent.linear_cross_entropy(h, torch.as_tensor(data["w"]), torch.as_tensor(data["y"]))
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)
    loss = multixent.linear_cross_entropy(h, torch.as_tensor(data["w"]), torch.as_tensor(data["y"]))
    h.grad = None
    (0.5 * loss).backward(retain_graph=True)
    (0.5 * loss).backward()
    torch.testing.assert_close(h.grad, first)


@pytest.fixture(params=["cpu", "accelerator"])
def strategy(request: Any, monkeypatch: Any) -> str:
    """torch's CPU strategy, or its accelerator strategy forced on CPU tensors (its private switch)."""
    from multixent import _compat

    monkeypatch.setattr(_compat, "ACCELERATOR_ON_CPU", request.param == "accelerator")
    return str(request.param)


@torch_only
@pytest.mark.parametrize("scenario", ["in-place-hooks-retained", "checkpoint", "checkpoint-reentrant", "save_on_cpu"])
def test_torch_autograd_contract_of_the_naive_path(strategy: str, scenario: str) -> None:
    """On the same graph as ``F.cross_entropy(F.linear(h, W))``: in-place gradient hooks on ``h`` and ``W``
    with a retained graph and a second backward (the hooks change the gradients handed on, which a second
    backward must not read), ``torch.utils.checkpoint`` (both kinds) and ``save_on_cpu``: the same gradients,
    on the CPU strategy and the accelerator strategy (forced on CPU tensors)."""
    torch = pytest.importorskip("torch")
    from torch.utils.checkpoint import checkpoint

    data = _data()

    def grads(loss_fn: Any) -> tuple[Any, Any]:
        h = torch.as_tensor(data["h"]).requires_grad_()
        w = torch.as_tensor(data["w"]).requires_grad_()
        y = torch.as_tensor(data["y"])
        a = h * 1.5
        if scenario == "in-place-hooks-retained":
            a.register_hook(lambda g: g.mul_(2))
            w.register_hook(lambda g: g.mul_(3))
            loss = loss_fn(a, w, y)
            loss.backward(retain_graph=True)
            loss.backward()
        elif scenario == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                loss = loss_fn(a, w, y)
            loss.backward()
        else:
            reentrant = scenario == "checkpoint-reentrant"
            checkpoint(lambda a_: loss_fn(a_, w, y), a, use_reentrant=reentrant).backward()
        return h.grad, w.grad

    want = grads(lambda a, w, y: torch.nn.functional.cross_entropy(a @ w.T, y))
    got = grads(lambda a, w, y: multixent.linear_cross_entropy(a, w, y, chunk_size=4))
    for g, wg in zip(got, want, strict=True):
        torch.testing.assert_close(g, wg)


@torch_only
def test_torch_hidden_states_freed_after_the_backward(strategy: str) -> None:
    """As for ``F.linear``, the graph, which lives as long as the loss does (in a training loop, into the next
    step's forward), holds the hidden states only until the backward has run."""
    torch = pytest.importorskip("torch")
    data = _data()
    w, y = torch.as_tensor(data["w"]).requires_grad_(), torch.as_tensor(data["y"])
    for loss_fn in (
        lambda h: torch.nn.functional.cross_entropy(h @ w.T, y),
        lambda h: multixent.linear_cross_entropy(h, w, y, chunk_size=4),
    ):
        h = torch.as_tensor(data["h"]).requires_grad_() * 2.0
        alive = weakref.ref(h)
        loss = loss_fn(h)
        del h
        loss.backward()
        gc.collect()
        assert alive() is None


@torch_only
def test_torch_saved_tensor_hooks_see_the_gradients(strategy: str) -> None:
    """The gradients computed in the forward are saved tensors: saved-tensor hooks (offloading, checkpointing)
    see them, and the backward reads them through the hooks."""
    torch = pytest.importorskip("torch")
    data = _data()
    h = torch.as_tensor(data["h"]).requires_grad_()
    w = torch.as_tensor(data["w"]).requires_grad_()
    y = torch.as_tensor(data["y"])
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.T, y), (h, w))
    packed: list[Any] = []

    def pack(t: Any) -> int:
        packed.append(t.detach().clone())
        return len(packed) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, packed.__getitem__):
        loss = multixent.linear_cross_entropy(h, w, y, chunk_size=4)
    for g in want:
        assert any(t.shape == g.shape and torch.allclose(t, g) for t in packed)
    loss.backward()
    torch.testing.assert_close((h.grad, w.grad), want)


@torch_only
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian", "vmap_grad", "gradcheck"])
def test_torch_func_transforms(transform: str) -> None:
    """torch.func over linear_cross_entropy (the unchunked path under a transform) equals the
    same transform of F.cross_entropy(h @ W.T + b)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, dtype=torch.float64, generator=gen), torch.randn(7, 4, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 1, 2, 3, -100, 6])
    opts = {"label_smoothing": 0.1}

    def ours(h: Any, w: Any) -> Any:
        return multixent.linear_cross_entropy(h, w, y, bias=b, **opts)

    def native(h: Any, w: Any) -> Any:
        return F.cross_entropy(h @ w.T + b, y, **opts)

    if transform == "gradcheck":
        args = (h.clone().requires_grad_(), w.clone().requires_grad_())
        assert torch.autograd.gradcheck(ours, args, check_batched_grad=True)
        return
    if transform == "vmap_grad":  # per-sample gradients
        y1 = torch.tensor([0, 1, 2, 3, 4, 6])

        def per(f: Any) -> Any:
            return torch.func.vmap(torch.func.grad(lambda hh, yy: f(hh[None], yy[None])))(h, y1)

        got = per(lambda hh, yy: multixent.linear_cross_entropy(hh, w, yy, bias=b))
        torch.testing.assert_close(got, per(lambda hh, yy: F.cross_entropy(hh @ w.T + b, yy)))
        return
    tr = getattr(torch.func, transform)
    got, want = tr(ours, argnums=(0, 1))(h, w), tr(native, argnums=(0, 1))(h, w)
    torch.testing.assert_close(got, want)


@torch_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(reduction: str) -> None:
    torch = pytest.importorskip("torch")
    spec = OPTIONS["all"]
    data = _data()
    y = torch.as_tensor(_target(spec, data))
    kw = _kwargs(spec, data, lambda a: torch.as_tensor(a, dtype=torch.float32))
    h, w, b = (torch.as_tensor(data[k], dtype=torch.float32) for k in ("h", "w", "b"))

    def loss(h, w, b):
        out = multixent.linear_cross_entropy(h, w, y, bias=b, chunk_size=4, reduction=reduction, **kw)
        return (out * torch.arange(1, out.numel() + 1).reshape(out.shape)).sum()

    # fullgraph=True: any graph break fails. aot_eager traces forward and backward
    # as torch.compile does, without the Inductor code generation (slow to compile).
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    want = loss(*ref_leaves)
    want_grads = torch.autograd.grad(want, ref_leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@torch_only
def test_torch_compile_inductor() -> None:
    torch = pytest.importorskip("torch")
    data = _data()
    h, w = (torch.as_tensor(data[k], dtype=torch.float32).requires_grad_() for k in ("h", "w"))
    y = torch.as_tensor(data["y"])
    compiled = torch.compile(lambda h, w: multixent.linear_cross_entropy(h, w, y, chunk_size=4), fullgraph=True)
    got = compiled(h, w)
    grads = torch.autograd.grad(got, (h, w))
    want = torch.nn.functional.cross_entropy(h @ w.T, y)
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want)
    for g, r in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, r)


# --------------------------------------------------------------------------
# JAX: against jax.grad of a naive jnp loss (and optax), float64


@pytest.fixture(scope="module")
def jax_x64():
    jax = pytest.importorskip("jax")
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", previous)


def _jax_native(x, y, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    import jax
    import jax.numpy as jnp

    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    counted = y != -100
    yy = jnp.where(counted, y, 0)
    wt = jnp.ones(x.shape[-1], x.dtype) if weight is None else weight
    logp = jax.nn.log_softmax(x, axis=-1)
    eps = label_smoothing
    ce = -(1 - eps) * wt[yy] * jnp.take_along_axis(logp, yy[:, None], axis=-1)[:, 0]
    ce = jnp.where(counted, ce - eps / x.shape[-1] * jnp.sum(logp * wt, axis=-1), 0.0)
    lse2 = jnp.where(counted, jax.nn.logsumexp(x, axis=-1) ** 2, 0.0)
    if reduction == "none":
        return ce + z_loss * lse2
    if reduction == "sum":
        return jnp.sum(ce) + z_loss * jnp.sum(lse2)
    return jnp.sum(ce) / jnp.sum(wt[yy] * counted) + z_loss * jnp.sum(lse2) / jnp.sum(counted)


def _jax_case(spec: dict, reduction: str, chunk: int | None, jit: bool, dtype=None):
    import jax
    import jax.numpy as jnp

    dtype = dtype or jnp.float64
    data = _data()
    y = jnp.asarray(_target(spec, data))
    kw = _kwargs(spec, data, lambda a: jnp.asarray(a, jnp.float64))
    b = jnp.asarray(data["b"]) if spec.get("bias") else None
    args = (jnp.asarray(data["h"]), jnp.asarray(data["w"]), b)

    def weighted(out):
        return jnp.sum(out * jnp.linspace(0.5, 2.0, max(out.size, 1)).reshape(out.shape))

    def fused(h, w, b):
        cast = (lambda a: a) if b is None else (lambda a: a.astype(dtype))
        out = multixent.linear_cross_entropy(
            h.astype(dtype), w.astype(dtype), y, bias=cast(b), chunk_size=chunk, reduction=reduction, **kw
        )
        return weighted(out.astype(jnp.float64))

    def naive(h, w, b):
        return weighted(_jax_native(h @ w.T + (0.0 if b is None else b), y, reduction=reduction, **kw))

    argnums = (0, 1, 2) if b is not None else (0, 1)
    f = jax.value_and_grad(fused, argnums=argnums)
    if jit:
        f = jax.jit(f)
    return f(*args), jax.value_and_grad(naive, argnums=argnums)(*args)


@jax_only
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_jax_values_and_grads(jax_x64, option: str, reduction: str, chunk: int) -> None:
    (got, g_got), (want, g_want) = _jax_case(OPTIONS[option], reduction, chunk, jit=True)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@jax_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_eager(jax_x64, reduction: str) -> None:
    (got, g_got), (want, g_want) = _jax_case(OPTIONS["all"], reduction, 4, jit=False)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@jax_only
def test_jax_against_optax(jax_x64) -> None:
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    data = _data()
    h, w, y = jnp.asarray(data["h"]), jnp.asarray(data["w"]), jnp.asarray(data["y"])
    fused = jax.jit(jax.value_and_grad(lambda h, w: multixent.linear_cross_entropy(h, w, y, chunk_size=4), (0, 1)))
    naive = jax.value_and_grad(
        lambda h, w: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y)), (0, 1)
    )
    (got, g_got), (want, g_want) = fused(h, w), naive(h, w)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@jax_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_bfloat16(jax_x64, reduction: str) -> None:
    import jax.numpy as jnp

    (got, g_got), (want, g_want) = _jax_case(OPTIONS["all"], reduction, 4, jit=True, dtype=jnp.bfloat16)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0.05, atol=0.05)


@jax_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_bfloat16_products_take_bfloat16_operands(reduction: str) -> None:
    """bfloat16 inputs: every matrix product of the value and its gradients (jit, the chunks in a ``lax.scan``) takes
    bfloat16 operands, its sum in float32 where the logits or ``W̄`` need it: what XLA gives a GPU's tensor cores,
    with no float32 copy of the classifier (``V·D`` float32 elements: 2 GB for a 128256 × 4096 head)."""
    import re

    import jax
    import jax.numpy as jnp

    n, d, v = 16, 8, 40
    h, w = jnp.ones((n, d), jnp.bfloat16), jnp.ones((v, d), jnp.bfloat16)
    t = jnp.zeros((n,), jnp.int32)

    def loss(h, w):
        out = multixent.linear_cross_entropy(h, w, t, chunk_size=4, reduction=reduction, z_loss=1e-2)
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w).as_text()
    operands = re.findall(r"stablehlo\.dot_general .*: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", text)
    assert len(operands) >= 3  # the logits, h̄ and W̄ (the "none" backward recomputes the logits: 4)
    for a, b, result in operands:
        assert a.endswith("xbf16>") and b.endswith("xbf16>"), (a, b, result)
    assert any(result.endswith("xf32>") for *_, result in operands)  # the logits (and W̄) summed in float32


@jax_only
def test_jax_vmap(jax_x64) -> None:
    import jax
    import jax.numpy as jnp

    data = _data()
    hs = jnp.stack([jnp.asarray(data["h"]), 2 * jnp.asarray(data["h"])])
    w, y = jnp.asarray(data["w"]), jnp.asarray(data["y"])
    fused = jax.vmap(jax.grad(lambda h: multixent.linear_cross_entropy(h, w, y, chunk_size=4, z_loss=0.1)))
    naive = jax.vmap(jax.grad(lambda h: _jax_native(h @ w.T, y, z_loss=0.1)))
    np.testing.assert_allclose(jax.jit(fused)(hs), naive(hs), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# Issue 9: autocast, bfloat16 parameters, class-weight gradients, D=0, torch.compile


def _torch_manual(x, y, weight, reduction: str, label_smoothing: float = 0.0):
    """Cross-entropy written out with differentiable torch ops (F.cross_entropy refuses weight gradients)."""
    import torch

    logp = torch.log_softmax(x, dim=-1)
    counted = y != -100
    yy = torch.where(counted, y, 0)
    eps = label_smoothing
    ce = -(1 - eps) * weight[yy] * logp.gather(1, yy[:, None])[:, 0] - eps / x.shape[-1] * (logp * weight).sum(-1)
    ce = torch.where(counted, ce, 0.0)
    if reduction == "none":
        return ce
    return ce.sum() if reduction == "sum" else ce.sum() / (weight[yy] * counted).sum()


def _bf16_close(got, want, name: str = "value") -> None:
    """Equal to bfloat16 rounding: 8 ulps of bfloat16 relative to the largest entry."""
    import torch

    eps = torch.finfo(torch.bfloat16).eps
    scale = want.detach().double().abs().max().clamp(min=1.0)
    torch.testing.assert_close(
        got.detach().double(),
        want.detach().double(),
        rtol=8 * eps,
        atol=8 * eps * scale.item(),
        msg=lambda m: f"{name}: {m}",
    )


@torch_only
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_autocast(reduction: str, bias: bool) -> None:
    """Under CPU bfloat16 autocast: float32 leaves, as F.cross_entropy(F.linear(h, W, b)) under the same autocast."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    data = _data(bias=bias)
    y = torch.as_tensor(data["y_ignored"])
    weight = torch.as_tensor(data["weight"], dtype=torch.float32)
    leaves = {k: torch.as_tensor(data[k], dtype=torch.float32) for k in ("h", "w", "b") if data[k] is not None}
    kw = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}

    def run(fn):
        ls = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(ls)
        up = torch.linspace(0.5, 2.0, max(out.numel(), 1)).reshape(out.shape)
        (out * up).sum().backward()
        return out, {k: v.grad for k, v in ls.items()}

    got, g_got = run(
        lambda ls: multixent.linear_cross_entropy(ls["h"], ls["w"], y, bias=ls.get("b"), chunk_size=4, **kw)
    )
    want, g_want = run(lambda ls: F.cross_entropy(F.linear(ls["h"], ls["w"], ls.get("b")), y, **kw))
    assert got.dtype == want.dtype == torch.float32
    _bf16_close(got, want)
    for k in g_want:
        assert g_got[k].dtype == torch.float32
        _bf16_close(g_got[k], g_want[k], f"grad of {k}")
    # the float64 loss of the bfloat16-rounded inputs: the value is that to float32 precision
    rounded = {k: v.bfloat16().double() for k, v in leaves.items()}
    x = rounded["h"] @ rounded["w"].T + rounded.get("b", 0.0)
    oracle = _torch_manual(x, y, weight.double(), reduction, 0.1)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-5)


@torch_only
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_bfloat16_parameters_no_bias(reduction: str, autocast: bool) -> None:
    """bfloat16 h and W (no bias), with and without autocast: as the naive path in bfloat16."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    data = _data(bias=False)
    y = torch.as_tensor(data["y"])

    def run(fn):
        h, w = (torch.as_tensor(data[k], dtype=torch.bfloat16).requires_grad_() for k in ("h", "w"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(h, w)
        out.float().sum().backward()
        return out, (h.grad, w.grad)

    got, g_got = run(lambda h, w: multixent.linear_cross_entropy(h, w, y, chunk_size=4, reduction=reduction))
    want, g_want = run(lambda h, w: F.cross_entropy(F.linear(h, w), y, reduction=reduction))
    assert got.dtype == want.dtype and all(g.dtype == torch.bfloat16 for g in g_got)
    _bf16_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        _bf16_close(a, b, "grad")


WEIGHT_GRAD_CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.3},
    "ignore": {"ignore": True},
    "all": {"ignore": True, "label_smoothing": 0.2, "bias": True},
}


@torch_only
@pytest.mark.parametrize("others", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(WEIGHT_GRAD_CASES))
def test_torch_weight_grad(option: str, reduction: str, others: bool) -> None:
    """The class weights' true derivative (the "mean" denominator included), alone or with h, W, b."""
    torch = pytest.importorskip("torch")
    spec, data = WEIGHT_GRAD_CASES[option], _data()
    y = torch.as_tensor(_target(spec, data))
    eps = spec.get("label_smoothing", 0.0)
    fixed = {k: torch.as_tensor(data[k]) for k in ("h", "w", "b", "weight")}
    if not spec.get("bias"):
        fixed["b"] = None

    def run(fn):
        leaves = {k: v.clone().requires_grad_(k == "weight" or others) for k, v in fixed.items() if v is not None}
        out = fn(leaves)
        up = torch.linspace(0.5, 2.0, max(out.numel(), 1), dtype=torch.float64).reshape(out.shape)
        (out * up).sum().backward()
        return out, {k: v.grad for k, v in leaves.items()}

    def fused(ls):
        return multixent.linear_cross_entropy(
            ls["h"],
            ls["w"],
            y,
            bias=ls.get("b"),
            weight=ls["weight"],
            chunk_size=4,
            reduction=reduction,
            label_smoothing=eps,
        )

    def naive(ls):
        return _torch_manual(ls["h"] @ ls["w"].T + ls.get("b", 0.0), y, ls["weight"], reduction, eps)

    got, g_got = run(fused)
    want, g_want = run(naive)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        if g_want[k] is not None or g_got[k] is not None:
            torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # and against float64 finite differences
    w0 = fixed["weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda wt: multixent.linear_cross_entropy(
            fixed["h"],
            fixed["w"],
            y,
            bias=fixed["b"],
            weight=wt,
            chunk_size=4,
            reduction=reduction,
            label_smoothing=eps,
        ),
        (w0,),
    )


@torch_only
def test_torch_weight_grad_issue_example() -> None:
    """The example of issue 9 (logits x = h @ W.T with W = I); its 3-digit numbers were [0.190, -0.095, 0]."""
    torch = pytest.importorskip("torch")
    h = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    multixent.linear_cross_entropy(h, torch.eye(3, dtype=torch.float64), torch.tensor([0, 1]), weight=w).backward()
    # by hand: loss = (w0·nll0 + w1·nll1) / (w0 + w1), so ∂/∂w0 = nll0/S - loss/S, ∂/∂w1 = nll1/S - loss/S
    nll0, nll1 = math.log(math.e + math.e**2 + math.e**3) - 1.0, math.log(math.e + 2.0)
    loss = (nll0 + 2.0 * nll1) / 3.0
    want = torch.tensor([(nll0 - loss) / 3.0, (nll1 - loss) / 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(w.grad, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(w.grad, torch.tensor([0.190, -0.095, 0.0], dtype=torch.float64), rtol=0, atol=5e-4)


@jax_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(WEIGHT_GRAD_CASES))
def test_jax_weight_grad(jax_x64, option: str, reduction: str) -> None:
    """jax.grad with respect to the class weights (and h): the naive jnp loss's, and finite differences."""
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    spec, data = WEIGHT_GRAD_CASES[option], _data()
    y = jnp.asarray(_target(spec, data))
    eps = spec.get("label_smoothing", 0.0)
    b = jnp.asarray(data["b"]) if spec.get("bias") else None
    h, w, wt = jnp.asarray(data["h"]), jnp.asarray(data["w"]), jnp.asarray(data["weight"])
    up = jnp.linspace(0.5, 2.0, N if reduction == "none" else 1)

    def fused(h, wt):
        out = multixent.linear_cross_entropy(
            h, w, y, bias=b, weight=wt, chunk_size=4, reduction=reduction, label_smoothing=eps
        )
        return jnp.sum(out * up)

    def naive(h, wt):
        x = h @ w.T + (0.0 if b is None else b)
        return jnp.sum(_jax_native(x, y, weight=wt, reduction=reduction, label_smoothing=eps) * up)

    grad = jax.jit(jax.grad(fused, argnums=(0, 1)))
    for a, r in zip(grad(h, wt), jax.grad(naive, argnums=(0, 1))(h, wt), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
    check_grads(jax.jit(lambda wt: fused(h, jnp.asarray(wt))), (wt,), order=1, modes=["rev"])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@numpy_only
def test_numpy_hidden_size_zero(reduction: str, bias: bool) -> None:
    """D=0: the logits are the bias (or 0): log C per row without bias."""
    from scipy.special import logsumexp

    rng = np.random.default_rng(0)
    b = rng.normal(size=V) if bias else None
    y = rng.integers(0, V, 6)
    got = multixent.linear_cross_entropy(
        np.zeros((2, 3, 0)), np.zeros((V, 0)), y.reshape(2, 3), bias=b, reduction=reduction, chunk_size=4
    )
    bb = np.zeros(V) if b is None else b
    rows = (logsumexp(bb) - bb[y]).reshape(2, 3)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if not bias:
        np.testing.assert_allclose(rows, np.log(V), rtol=1e-12)


@torch_only
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_hidden_size_zero(reduction: str, bias: bool) -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    y = torch.tensor([0, 3, 7, 12, 3, 3])
    b0 = torch.linspace(-1.0, 2.0, V, dtype=torch.float64) if bias else None

    def run(fn):
        h = torch.zeros(6, 0, dtype=torch.float64, requires_grad=True)
        w = torch.zeros(V, 0, dtype=torch.float64, requires_grad=True)
        b = None if b0 is None else b0.clone().requires_grad_()
        out = fn(h, w, b)
        out.sum().backward()
        return out, [t.grad for t in (h, w, b) if t is not None]

    got, g_got = run(lambda h, w, b: multixent.linear_cross_entropy(h, w, y, bias=b, chunk_size=4, reduction=reduction))
    want, g_want = run(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), y, reduction=reduction))
    torch.testing.assert_close(got, want)
    for a, r in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, r)


@jax_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_hidden_size_zero(jax_x64, reduction: str) -> None:
    import jax
    import jax.numpy as jnp

    y = jnp.asarray([0, 3, 7, 12, 3, 3])
    b = jnp.linspace(-1.0, 2.0, V)
    h, w = jnp.zeros((6, 0)), jnp.zeros((V, 0))

    def fused(h, w, b):
        return jnp.sum(multixent.linear_cross_entropy(h, w, y, bias=b, chunk_size=4, reduction=reduction))

    def naive(h, w, b):
        return jnp.sum(_jax_native(h @ w.T + b, y, reduction=reduction))

    for got, want in zip(
        jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, b),
        jax.value_and_grad(naive, argnums=(0, 1, 2))(h, w, b),
        strict=True,
    ):
        jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-15), got, want)
    out = multixent.linear_cross_entropy(h, w, y, reduction=reduction)
    np.testing.assert_allclose(out, np.log(V) * (6 if reduction == "sum" else 1), rtol=1e-12)


@torch_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_graph_does_not_grow_with_chunks(reduction: str) -> None:
    """The chunk loop runs inside custom ops: 1 and 32 chunks trace the same graphs; values and grads as eager."""
    torch = pytest.importorskip("torch")
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    n, d, v = 32, 16, 100
    gen = torch.Generator().manual_seed(0)
    h0, w0, b0 = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen), torch.randn(v, generator=gen)
    wt0 = torch.rand(v, generator=gen) + 0.5
    y = torch.randint(0, v, (n,), generator=gen)

    def loss(h, w, b, wt, chunk):
        out = multixent.linear_cross_entropy(
            h, w, y, bias=b, weight=wt, chunk_size=chunk, reduction=reduction, z_loss=0.1
        )
        return (out * torch.arange(1, out.numel() + 1).reshape(out.shape)).sum()

    graphs: dict[int, list[str]] = {}
    for chunk in (n, 1):
        torch._dynamo.reset()
        nodes: list[str] = []

        def record(gm, example_inputs, nodes=nodes):
            nodes.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return make_boxed_func(gm.forward)

        compiled = torch.compile(
            lambda *a, chunk=chunk: loss(*a, chunk),
            fullgraph=True,
            backend=aot_autograd(fw_compiler=record, bw_compiler=record),
        )
        leaves = [t.clone().requires_grad_() for t in (h0, w0, b0, wt0)]
        got = compiled(*leaves)
        grads = torch.autograd.grad(got, leaves)
        refs = [t.clone().requires_grad_() for t in (h0, w0, b0, wt0)]
        want = loss(*refs, chunk)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads, torch.autograd.grad(want, refs), strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        graphs[chunk] = nodes
    assert graphs[n] == graphs[1]
    assert sum("mm" in name for name in graphs[1]) == 0  # every matrix product is inside the ops
    assert any("multixent" in name for name in graphs[1])


@torch_only
def test_torch_custom_ops_opcheck() -> None:
    """The custom ops' schemas and fake (meta) implementations agree with the real ones."""
    torch = pytest.importorskip("torch")
    from multixent._adapters import torch as adapter

    data = _data()
    h, w, b, weight = (torch.as_tensor(data[k]) for k in ("h", "w", "b", "weight"))
    y = torch.as_tensor(data["y_ignored"])
    opts = (-100, 0.1, 3.0, True, 4)
    ones = torch.ones(N, dtype=torch.float64)
    cases = [
        (adapter._rows_op, (h, w, b, y, weight, *opts)),
        (adapter._rows_op, (h, w, None, y, None, *opts)),
        (adapter._loss_and_grads_op, (h, w, b, y, weight, torch.tensor(0.5, dtype=torch.float64), None, *opts)),
        (adapter._rows_vjp_op, (h, w, None, y, weight, ones, ones, *opts)),
        (adapter._weight_vjp_op, (h, w, b, y, ones, *opts)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@torch_only
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_gradcheck_and_gradgradcheck(reduction: str) -> None:
    """gradcheck and gradgradcheck (batched) with every option, gradients of h, W, b and the class weights."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, dtype=torch.float64, generator=gen), torch.randn(7, 4, dtype=torch.float64, generator=gen)
    b, cw = torch.randn(7, dtype=torch.float64, generator=gen), torch.rand(7, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 1, 2, 3, -100, 6])
    args = tuple(a.requires_grad_() for a in (h, w, b, cw))

    def f(h: Any, w: Any, b: Any, cw: Any) -> Any:
        opts = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 5.0, "reduction": reduction}
        return multixent.linear_cross_entropy(h, w, y, bias=b, weight=cw, **opts)

    assert torch.autograd.gradcheck(f, args, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True)
