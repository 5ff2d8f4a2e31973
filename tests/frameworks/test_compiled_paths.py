"""Compiled paths: torch.compile of the public functions warns of nothing (issue 13 item 4), and
under jax.jit(value_and_grad) each option holds no logits-sized buffer beyond the gradient (issue 12
item 6: XLA's temp + output bytes, memory_analysis(), at most 1.05x the logits) and makes no more
passes over them than optax."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest
from conftest import SELECTED

import multixent as mx


@pytest.mark.skipif("torch" not in SELECTED, reason="backend torch not selected (MULTIXENT_BACKENDS)")
@pytest.mark.parametrize(
    "name",
    ["cross_entropy_options", "cross_entropy_probs", "cross_entropy_and_grad", "nll_loss", "logsumexp", "linear"],
)
def test_torch_compile_warns_nothing(name: str) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    h, w = torch.randn(8, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
    opts: dict[str, Any] = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 30.0, "weight": torch.rand(10)}
    cases: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "cross_entropy_options": (lambda a, b: mx.cross_entropy(a, b, **opts), (x, y)),
        "cross_entropy_probs": (mx.cross_entropy, (x, torch.softmax(torch.randn(8, 10), -1))),
        "cross_entropy_and_grad": (lambda a, b: mx.cross_entropy_and_grad(a, b)[1].sum(), (x.detach(), y)),
        "nll_loss": (mx.nll_loss, (x, y)),
        "logsumexp": (lambda a: mx.logsumexp(a).sum() + mx.log_softmax(a).sum(), (x,)),
        "linear": (mx.linear_cross_entropy, (h, w, y)),
    }
    fn, args = cases[name]
    torch._dynamo.reset()
    torch.compile(lambda a: (a * 2).sum(), fullgraph=True)(torch.ones(2))  # torch's own first-compile warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(fn, fullgraph=True)(*args)
        if out.requires_grad:
            out.backward()
    assert [str(m.message).splitlines()[0] for m in caught] == []


def _refused_while_tracing(method: Any) -> Any:
    def refuse(self: Any, *args: Any) -> Any:
        if sys.modules["torch"].compiler.is_compiling():
            raise AssertionError("a table of kept answers was touched while torch.compile traced")
        return method(self, *args)

    return refuse


class _Untouchable(dict):  # type: ignore[type-arg]
    """A table that refuses to be read or written while torch.compile traces (the compiled call's own eager
    parts, such as linear_cross_entropy's custom op, may use it)."""

    __getattribute__ = _refused_while_tracing(dict.__getattribute__)
    __len__ = _refused_while_tracing(dict.__len__)
    __iter__ = _refused_while_tracing(dict.__iter__)
    __contains__ = _refused_while_tracing(dict.__contains__)
    __getitem__ = _refused_while_tracing(dict.__getitem__)
    __setitem__ = _refused_while_tracing(dict.__setitem__)


@pytest.mark.skipif("torch" not in SELECTED, reason="backend torch not selected (MULTIXENT_BACKENDS)")
def test_torch_compile_touches_no_kept_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """While torch.compile traces, the answers multixent keeps per namespace, dtype, type or option values
    (``_compat.Memo``) are neither read nor written: dynamo before torch 2.13 cannot hash the modules and NumPy
    dtypes among their keys, and a table handed to it stops a fullgraph trace (on torch 2.11, every compiled
    call after an eager one). Here every table refuses any access while the calls are traced."""
    import numpy as np
    import torch

    from multixent import _compat

    x = torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    h, w = torch.randn(8, 6, requires_grad=True), torch.randn(10, 6)
    opts: dict[str, Any] = {"label_smoothing": 0.1, "z_loss": 1e-3, "weight": torch.rand(10)}
    calls = [lambda: mx.cross_entropy(x, y, **opts), lambda: mx.linear_cross_entropy(h, w, y)]
    for call in calls:  # eagerly first: the tables hold torch's namespace and dtypes, and NumPy's
        call().backward()
    mx.cross_entropy(x.detach().numpy(), y.numpy().astype(np.int32))
    tables = {id(v): v for m in list(sys.modules.values()) for v in vars(m).values() if isinstance(v, _compat.Memo)}
    assert len(tables) >= 5
    for table in tables.values():
        monkeypatch.setattr(table, "_found", _Untouchable())
    torch._dynamo.reset()
    for call in calls:
        torch.compile(call, fullgraph=True)().backward()


@pytest.mark.skipif("jax" not in SELECTED, reason="backend jax not selected (MULTIXENT_BACKENDS)")
@pytest.mark.parametrize(
    "option",
    [
        {},
        {"weight": True},
        {"z_loss": 1e-4},
        {"softcap": 30.0},
        {"label_smoothing": 0.1},
        {"softcap": 30.0, "z_loss": 1e-4, "weight": True},
        {"label_smoothing": 0.1, "z_loss": 1e-4, "weight": True},
    ],
    ids=str,
)
def test_jax_grad_memory_is_the_gradient(option: dict[str, Any]) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    n, c = 256, 32000
    kw = dict(option, weight=jnp.full((c,), 0.5)) if "weight" in option else option
    # the target is an argument, traced as in training (a constant one lets XLA fold the ignore_index mask)
    f = jax.jit(jax.value_and_grad(lambda a, t: mx.cross_entropy(a, t, **kw)))
    args = jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)
    m = f.lower(*args).compile().memory_analysis()
    assert (m.temp_size_in_bytes + m.output_size_in_bytes) / (n * c * 4) <= 1.05


@pytest.mark.skipif("jax" not in SELECTED, reason="backend jax not selected (MULTIXENT_BACKENDS)")
def test_jax_grad_passes_over_the_logits_as_optax() -> None:
    """jax.jit(value_and_grad): no more logits-sized steps than optax's (exp, the softmax's product by a
    per-row factor, the target's scatter), and no per-logit comparison (a one-hot target term, 1.13x
    optax's time at 512 x 1000 on the CPU)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    n, c = 256, 1000
    args = jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)

    def hlo(loss: Any) -> str:
        return str(jax.jit(jax.value_and_grad(loss)).lower(*args).compile().as_text())

    def logits_sized(text: str) -> list[str]:
        entry = text[text.index("\nENTRY") :].splitlines()
        return [s for s in entry if f"= f32[{n},{c}]" in s and "parameter(" not in s]

    ours = hlo(mx.cross_entropy)
    native = hlo(lambda a, t: optax.softmax_cross_entropy_with_integer_labels(a, t).mean())
    assert len(logits_sized(ours)) <= len(logits_sized(native)), logits_sized(ours)
    assert f"pred[{n},{c}]{{1,0}} compare(" not in ours
