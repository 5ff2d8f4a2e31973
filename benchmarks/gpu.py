"""multixent on one GPU: parity, then time and memory against the native losses; a markdown report.

Run on a machine with one CUDA GPU (torch; JAX, CuPy, Liger-Kernel, Cut Cross-Entropy when they import):

    python benchmarks/gpu.py                       # writes benchmarks/results/gpu.md, within ~4 minutes on an H100
    python benchmarks/gpu.py --dry --out /tmp/g.md # tiny sizes on the CPU, the accelerator strategy forced on CPU
                                                   # tensors (what CI runs, through `nox -s gpu`): not a measurement

It measures the checkout it lies in (the repository root goes first on ``sys.path``) and writes:

1. **Parity**: for a grid of option sets (none, class weights, label smoothing, ignored rows, z-loss, softcap,
   probability targets, several at once) × reductions × dtypes, multixent's value and gradient on the device
   against a float64 CPU oracle: ``F.cross_entropy`` in float64 for torch tensors; optax in float64 for
   JAX arrays (``F.cross_entropy``'s float64 where optax lacks the option); multixent on NumPy float64 for
   CuPy arrays (``cross_entropy_and_grad``). Each torch call's host synchronisations are counted too
   (``torch.cuda.set_sync_debug_mode``; on the CPU the host reads of ``benchmarks/passes.py``). With ``--dry``:
   CPU tensors, CPU JAX arrays, and NumPy standing in for CuPy. Four option sets again with the pass compiled
   (``COMPILED_PARITY``; one with ``--dry``, where the CPU's host-read count runs it eagerly).
2. **Passes**: the eager forward+backward's operations, bytes read and written per logit and host reads, counted
   with a ``TorchDispatchMode`` (``benchmarks/passes.py``), beside ``F.cross_entropy``'s.
3. **Grid** 64×10, 512×1000, 4096×32000, 8192×128256, float32 and bfloat16: time (CUDA events, warm, median) and
   peak memory beyond the inputs (``torch.cuda.max_memory_allocated``) of forward and forward+backward, multixent
   against ``F.cross_entropy`` eager, and the kernels one call launches (torch's profiler, CUDA only); both under
   ``torch.compile`` (forward+backward at 4096×32000, compile time apart), and there multixent's eager call with
   its loss-and-gradient pass compiled (the private ``COMPILED_STRATEGY``) against the eager native loss: on by
   default only if faster than the eager strategy; ``jax.jit(value_and_grad)`` against optax (memory from
   ``compile().memory_analysis()``);
   ``linear_cross_entropy`` at 8192 × 4096 × 128256 bfloat16 against ``F.linear`` + ``F.cross_entropy`` (and
   Liger-Kernel, Cut Cross-Entropy when they import); with JAX arrays, its bfloat16 parity on the device and
   ``jax.jit(value_and_grad)`` against the logits formed (``h @ W.T`` and optax). Ratios are against the native
   loss of the same run.

They run in the order that keeps what the open decisions need first, should the budget or the machine's time
run out: torch's parity, the passes, the 4096×32000 point (eager and compiled), ``linear_cross_entropy``, JAX's
and CuPy's parity, JAX at 4096×32000, JAX's ``linear_cross_entropy``, then the rest of the grid. The report is
written after each part.

A point that runs out of memory is recorded as OOM; once ``--budget`` seconds have passed the remaining points
are skipped, and the report says which. The exit status is 1 when a parity case fails or a point raises.

The GPU machine has no network: ``benchmarks/gpu_check.sh`` installs what it lacks from a local wheel folder
(``wheels/``, git-ignored, filled beforehand by the command in DEVELOPERS.md), runs the CUDA tests, then this
script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "gpu.md"

GRID = [(64, 10), (512, 1000), (4096, 32000), (8192, 128256)]
DRY_GRID = [(64, 10), (128, 1000)]
COMPILE_AT, DRY_COMPILE_AT = (4096, 32000), (128, 1000)
PASSES_AT, DRY_PASSES_AT = (4096, 32000), (256, 1000)
LINEAR, DRY_LINEAR = (8192, 4096, 128256), (128, 64, 1000)
PARITY_SHAPE, DRY_PARITY_SHAPE = (37, 1000), (37, 50)
LINEAR_PARITY, DRY_LINEAR_PARITY = (64, 256, 32000), (37, 16, 50)
#: parity: the largest error allowed, relative to the oracle's largest magnitude, by the device's dtype
TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
#: option sets of the parity grid (``ignore``: every 5th target is ignore_index; ``probs``: probability targets)
CASES: dict[str, dict[str, Any]] = {
    "none": {},
    "weight": {"weight": True},
    "label_smoothing": {"label_smoothing": 0.1},
    "ignore_index": {"ignore": True},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 5.0},
    "every option": {"weight": True, "label_smoothing": 0.1, "ignore": True, "z_loss": 1e-2, "softcap": 5.0},
    "probabilities": {"probs": True},
    "probabilities with options": {"probs": True, "weight": True, "label_smoothing": 0.1, "softcap": 5.0},
}
REDUCTIONS = ("none", "sum", "mean")
MiB = 2**20


def optional(name: str) -> Any:
    """The module, or None when it does not import (any error: a broken install is an absent one here)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str, needs: float = 0.0) -> bool:
        """True while ``needs`` seconds remain; else ``what`` is recorded as skipped."""
        if self.left() > needs:
            return True
        self.skipped.append(what)
        return False


# --------------------------------------------------------------------------
# Parity


def case_inputs(spec: dict[str, Any], shape: tuple[int, int], seed: int) -> dict[str, Any]:
    """float64 NumPy inputs of one parity case: logits, target, class weights, the cotangent of "none"."""
    rng = np.random.default_rng(seed)
    n, c = shape
    x = 3 * rng.standard_normal((n, c))
    if spec.get("probs"):
        p = np.exp(rng.standard_normal((n, c)))
        t = p / p.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, c, n)
        if spec.get("ignore"):
            t[::5] = -100
    w = rng.uniform(0.5, 2.0, c) if spec.get("weight") else None
    return {"x": x, "t": t, "w": w, "g": rng.standard_normal(n)}


def options(spec: dict[str, Any], reduction: str) -> dict[str, Any]:
    """The keyword options of a case, without ``weight``."""
    opts = {k: spec[k] for k in ("label_smoothing", "z_loss", "softcap") if k in spec}
    return {**opts, "reduction": reduction}


def torch_oracle(x: Any, t: Any, w: Any, opts: dict[str, Any]) -> Any:
    """F.cross_entropy (float64, CPU) with the softcap before it and the z-loss beside it."""
    import torch
    import torch.nn.functional as F

    softcap, z, reduction = opts.get("softcap"), opts.get("z_loss", 0.0), opts["reduction"]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0))
    if z:
        counted = torch.ones(x.shape[0], dtype=torch.bool) if t.is_floating_point() else t != -100
        lse2 = torch.where(counted, torch.logsumexp(x, -1), 0.0) ** 2
        loss = loss + z * {"none": lse2, "sum": lse2.sum(), "mean": lse2.sum() / counted.sum()}[reduction]
    return loss


def error(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-30))


def parity_cases(dtypes: list[str]) -> Iterator[tuple[str, str, dict[str, Any], str, int]]:
    seed = 0
    for dtype in dtypes:
        for case, spec in CASES.items():
            for reduction in REDUCTIONS:
                seed += 1
                yield dtype, case, spec, reduction, seed


#: parity of the strategy compiled (``COMPILED_STRATEGY``; each a compile): (dtype, case, reduction)
COMPILED_PARITY = [
    ("float32", "every option", "mean"),
    ("bfloat16", "every option", "mean"),
    ("float32", "none", "sum"),
    ("bfloat16", "ignore_index", "mean"),
]


def strategy_compiled(on: bool = True) -> contextlib.AbstractContextManager[Any]:
    """multixent's accelerator strategy with its passes compiled (the private ``COMPILED_STRATEGY``), or not,
    for the duration (read when a call computes its gradients: in the forward)."""
    from multixent import _compat

    return mock.patch.object(_compat, "COMPILED_STRATEGY", on)


def parity_torch(device: str, shape: tuple[int, int], compiled_cases: int) -> list[dict[str, Any]]:
    """multixent's value and gradient (autograd, and cross_entropy_and_grad) on ``device`` against torch_oracle;
    then the first ``compiled_cases`` of :data:`COMPILED_PARITY` with the strategy compiled."""
    results = _parity_torch(device, shape, parity_cases(["float32", "bfloat16"]))
    chosen = set(COMPILED_PARITY[:compiled_cases])
    cases = [c for c in parity_cases(["float32", "bfloat16"]) if (c[0], c[1], c[3]) in chosen]
    with strategy_compiled():  # twice: the first call of each case compiles (its host syncs are the compiler's)
        _parity_torch(device, shape, iter(cases), and_grad=False)
        compiled = _parity_torch(device, shape, iter(cases), and_grad=False)
    return results + [{**r, "framework": "torch, strategy compiled"} for r in compiled]


def _parity_torch(
    device: str,
    shape: tuple[int, int],
    cases: Iterator[tuple[str, str, dict[str, Any], str, int]],
    and_grad: bool = True,
) -> list[dict[str, Any]]:
    import torch

    results = []
    for dtype, case, spec, reduction, seed in cases:
        d = case_inputs(spec, shape, seed)
        tdtype = getattr(torch, dtype)
        x = torch.tensor(d["x"]).to(device=device, dtype=tdtype).requires_grad_()
        t = torch.tensor(d["t"]).to(device=device, dtype=tdtype if spec.get("probs") else torch.int64)
        w = None if d["w"] is None else torch.tensor(d["w"]).to(device=device, dtype=tdtype)
        opts = options(spec, reduction)
        x64 = x.detach().cpu().double().requires_grad_()
        w64 = None if w is None else w.cpu().double()
        ref = torch_oracle(x64, t.cpu().double() if spec.get("probs") else t.cpu(), w64, opts)
        g = torch.tensor(d["g"]) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
        ref.backward(g)
        g = g.to(device=device, dtype=x.dtype)
        loss, syncs = host_syncs(functools.partial(_forward_backward, x, t, w, opts, g), device)
        row = {"framework": "torch", "dtype": dtype, "case": case, "reduction": reduction, "host_syncs": syncs}
        results.append(check(row, loss, x.grad, ref, x64.grad))
        if reduction != "none" and and_grad:
            pair, syncs = host_syncs(functools.partial(_and_grad, x.detach(), t, w, opts), device)
            row = {**row, "case": f"{case} (cross_entropy_and_grad)", "host_syncs": syncs}
            results.append(check(row, *pair, ref, x64.grad))
    return results


#: parity of linear_cross_entropy in bfloat16 (its products take the inputs' dtype on accelerators): case → options
LINEAR_CASES: dict[str, dict[str, Any]] = {
    "none": {},
    "label_smoothing, ignore_index": {"label_smoothing": 0.1, "ignore": True},
    "sum, z_loss": {"reduction": "sum", "z_loss": 1e-2},
}


def parity_linear(device: str, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """``linear_cross_entropy`` of bfloat16 ``(N, D)`` hidden states and a ``(V, D)`` classifier on ``device``
    (8 chunks) against ``F.cross_entropy`` of ``F.linear`` in float64 of the same values: the value and the
    gradients of both (the z-loss added to the oracle's rows); then with the chunks' pass compiled
    (``COMPILED_STRATEGY``), each case twice (the first compiles: its host synchronisations are the compiler's)."""
    results = _parity_linear(device, shape, "torch linear_cross_entropy")
    with strategy_compiled():
        _parity_linear(device, shape, "")
        results += _parity_linear(device, shape, "torch linear_cross_entropy, strategy compiled")
    return results


def _parity_linear(device: str, shape: tuple[int, int, int], framework: str) -> list[dict[str, Any]]:

    import multixent

    n = shape[0]
    results = []
    for case, h, w, t, kw, z in linear_cases(shape, seed=100):
        hd, wd = (a.to(device, copy=True).requires_grad_() for a in (h, w))

        def step(hd: Any = hd, wd: Any = wd, t: Any = t, kw: dict[str, Any] = kw, z: float = z) -> Any:
            loss = multixent.linear_cross_entropy(hd, wd, t.to(device), chunk_size=-(-n // 8), z_loss=z, **kw)
            loss.backward()
            return loss

        loss, syncs = host_syncs(step, device)
        row = {"framework": framework, "dtype": "bfloat16", "case": case, "host_syncs": syncs}
        results += check_linear(row, loss, (hd.grad, wd.grad), (h, w, t, kw, z))
    return results


def linear_cases(shape: tuple[int, int, int], seed: int) -> Iterator[tuple[Any, ...]]:
    """Each linear parity case (:data:`LINEAR_CASES`) as ``(case, h, w, t, kw, z)``: bfloat16 CPU tensors, the
    class indices (every 5th ignored where the case says so), the other options and the z-loss coefficient."""
    import torch

    n, d, v = shape
    for i, (case, spec) in enumerate(LINEAR_CASES.items()):
        gen = torch.Generator().manual_seed(seed + i)
        h, w = torch.randn(n, d, generator=gen).bfloat16(), (torch.randn(v, d, generator=gen) / 8).bfloat16()
        t = torch.randint(0, v, (n,), generator=gen)
        kw = dict(spec)
        if kw.pop("ignore", False):
            t[::5] = -100
        yield case, h, w, t, kw, kw.pop("z_loss", 0.0)


def check_linear(row: dict[str, Any], value: Any, grads: tuple[Any, Any], inputs: tuple[Any, ...]) -> list[dict]:
    """:func:`check` of a linear case's ``h̄`` and ``W̄`` against ``F.cross_entropy(h @ w.T, t, **kw)`` plus the
    z-loss of the counted rows, in float64 on the CPU (``inputs``: ``(h, w, t, kw, z)`` of :func:`linear_cases`)."""
    import torch
    import torch.nn.functional as F

    h, w, t, kw, z = inputs
    h64, w64 = (a.double().requires_grad_() for a in (h, w))
    logits = h64 @ w64.T
    ref = F.cross_entropy(logits, t, **kw)
    if z:
        lse = torch.logsumexp(logits, -1)[t != -100]
        ref = ref + z * (lse * lse).sum()
    ref.backward()
    row = {**row, "reduction": kw.get("reduction", "mean")}
    return [
        check({**row, "case": f"{row['case']} ({bar})"}, value, grad, ref, ref_grad)
        for bar, grad, ref_grad in (("h̄", grads[0], h64.grad), ("W̄", grads[1], w64.grad))
    ]


def parity_jax_linear(device: Any, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """``linear_cross_entropy`` of bfloat16 JAX arrays on ``device`` (8 chunks, ``jit(value_and_grad)`` in the
    hidden states and the classifier; its products on bfloat16 operands) against :func:`check_linear`'s oracle."""
    import jax
    import jax.numpy as jnp

    import multixent

    n = shape[0]
    results = []
    for case, h, w, t, kw, z in linear_cases(shape, seed=200):
        hj, wj = (jax.device_put(jnp.asarray(a.float().numpy(), jnp.bfloat16), device) for a in (h, w))
        tj = jax.device_put(jnp.asarray(t.numpy(), jnp.int32), device)

        def loss(h: Any, w: Any, t: Any = tj, kw: dict[str, Any] = kw, z: float = z) -> Any:
            return multixent.linear_cross_entropy(h, w, t, chunk_size=-(-n // 8), z_loss=z, **kw)

        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hj, wj)
        row = {"framework": "jax linear_cross_entropy", "dtype": "bfloat16", "case": case}
        results += check_linear(row, value, grads, (h, w, t, kw, z))
    return results


def _forward_backward(x: Any, t: Any, w: Any, opts: dict[str, Any], g: Any) -> Any:
    import multixent

    loss = multixent.cross_entropy(x, t, weight=w, **opts)
    loss.backward(g)
    return loss


def _and_grad(x: Any, t: Any, w: Any, opts: dict[str, Any]) -> Any:
    import torch

    import multixent

    with torch.no_grad():
        return multixent.cross_entropy_and_grad(x, t, weight=w, **opts)


def host_syncs(fn: Callable[[], Any], device: str) -> tuple[Any, int]:
    """``fn()`` and the host synchronisations it makes: on CUDA those ``torch.cuda.set_sync_debug_mode``
    reports; on the CPU the host reads ``benchmarks/passes.py`` counts (``.item()``, ``.tolist()``, ...)."""
    import torch

    out: list[Any] = []
    if device != "cuda":
        reads = load_passes().count(lambda: out.append(fn()))["host_reads"]
        return out[0], int(reads)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out.append(fn())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out[0], sum("synchroniz" in str(w.message) for w in caught)


def load_passes() -> Any:
    """``benchmarks/passes.py``, by its path (benchmarks/ is no package)."""
    if "multixent_bench_passes" not in sys.modules:
        spec = importlib.util.spec_from_file_location("multixent_bench_passes", HERE / "passes.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["multixent_bench_passes"]


def check(row: dict[str, Any], value: Any, grad: Any, ref: Any, ref_grad: Any) -> dict[str, Any]:
    host = lambda a: None if a is None else np.asarray(_to_numpy(a), dtype=np.float64)  # noqa: E731
    v_err = error(host(value), host(ref))
    g_err = None if grad is None else error(host(grad), host(ref_grad))
    ok = v_err <= TOL[row["dtype"]] and (g_err is None or g_err <= TOL[row["dtype"]])
    return {**row, "value_err": v_err, "grad_err": g_err, "ok": ok}


def _to_numpy(a: Any) -> Any:
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().float().numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a.astype("float32") if str(a.dtype) == "bfloat16" else a)


def jax_x64() -> Any:
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def parity_jax(device: Any, shape: tuple[int, int]) -> list[dict[str, Any]]:
    """multixent's value and ``jax.vjp`` on ``device`` against optax in float64 on the CPU, or F.cross_entropy's
    float64 for the options optax lacks (class weights, label smoothing, ignore_index)."""
    import jax
    import jax.numpy as jnp

    import multixent

    optax, torch = optional("optax"), optional("torch")
    cpu = jax.devices("cpu")[0]
    results = []
    for dtype, case, spec, reduction, seed in parity_cases(["float32", "bfloat16"]):
        d = case_inputs(spec, shape, seed)
        row = {"framework": "jax", "dtype": dtype, "case": case, "reduction": reduction}
        jdtype = getattr(jnp, dtype)
        x = jax.device_put(jnp.asarray(d["x"], dtype=jdtype), device)
        t = jax.device_put(jnp.asarray(d["t"], dtype=jdtype if spec.get("probs") else jnp.int32), device)
        w = None if d["w"] is None else jax.device_put(jnp.asarray(d["w"], dtype=jdtype), device)
        opts = options(spec, reduction)
        value, vjp = jax.vjp(lambda x, t=t, w=w, opts=opts: multixent.cross_entropy(x, t, weight=w, **opts), x)
        g = jnp.asarray(d["g"] if reduction == "none" else 1.0, dtype=value.dtype)
        (grad,) = vjp(jax.device_put(g, device))
        x64, t64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(t.astype(jnp.float32), np.float64)
        t64 = t64 if spec.get("probs") else np.asarray(t, np.int64)
        w64 = None if w is None else np.asarray(w.astype(jnp.float32), np.float64)
        g64 = np.asarray(g.astype(jnp.float32), np.float64)
        if optax is not None and not ({"weight", "label_smoothing", "ignore"} & set(spec)):
            with jax_x64(), jax.default_device(cpu):
                ref, ref_vjp = jax.vjp(lambda x, t=t64, opts=opts: optax_oracle(optax, x, t, opts), jnp.asarray(x64))
                ref, ref_grad = np.asarray(ref), np.asarray(ref_vjp(jnp.asarray(g64))[0])
            row["oracle"] = "optax"
        elif torch is not None:
            x64t = torch.tensor(x64, requires_grad=True)
            ref = torch_oracle(x64t, torch.tensor(t64), None if w64 is None else torch.tensor(w64), opts)
            ref.backward(torch.tensor(g64))
            ref, ref_grad = ref.detach(), x64t.grad
            row["oracle"] = "F.cross_entropy"
        else:
            continue
        results.append(check(row, value, grad, ref, ref_grad))
    return results


def optax_oracle(optax: Any, x: Any, t: Any, opts: dict[str, Any]) -> Any:
    import jax
    import jax.numpy as jnp

    softcap, z = opts.get("softcap"), opts.get("z_loss", 0.0)
    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    if t.dtype.kind == "f":
        per = optax.softmax_cross_entropy(x, t)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(x, t)
    per = per + z * jax.nn.logsumexp(x, axis=-1) ** 2
    return {"none": per, "sum": jnp.sum(per), "mean": jnp.mean(per)}[opts["reduction"]]


def parity_array_api(xp: Any, name: str, shape: tuple[int, int]) -> list[dict[str, Any]]:
    """CuPy (or NumPy standing in for it): ``cross_entropy_and_grad`` ("sum", "mean") and ``cross_entropy``
    ("none") against multixent on NumPy float64."""
    import multixent

    results = []
    for dtype, case, spec, reduction, seed in parity_cases(["float32", "float16"]):
        d = case_inputs(spec, shape, seed)
        row = {"framework": name, "dtype": dtype, "case": case, "reduction": reduction}
        x_np = d["x"].astype(dtype)
        t_np = d["t"].astype(dtype) if spec.get("probs") else d["t"]
        w_np = None if d["w"] is None else d["w"].astype(dtype)
        x, t, w = xp.asarray(x_np), xp.asarray(t_np), None if w_np is None else xp.asarray(w_np)
        opts = options(spec, reduction)
        f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
        x64, t64, w64 = f64(x_np), f64(t_np) if spec.get("probs") else t_np, f64(w_np)
        if reduction == "none":
            value, grad = multixent.cross_entropy(x, t, weight=w, **opts), None
            ref, ref_grad = multixent.cross_entropy(x64, t64, weight=w64, **opts), None
        else:
            value, grad = multixent.cross_entropy_and_grad(x, t, weight=w, **opts)
            ref, ref_grad = multixent.cross_entropy_and_grad(x64, t64, weight=w64, **opts)
        results.append(check(row, value, grad, ref, ref_grad))
    return results


# --------------------------------------------------------------------------
# Timing and memory


class Meter:
    """Warm median times (CUDA events on a GPU, ``perf_counter`` on the CPU) and peak memory beyond what was
    allocated before the call (CUDA only)."""

    def __init__(self, cuda: bool, target_s: float) -> None:
        self.cuda, self.target_s = cuda, target_s

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def peak(self, fn: Callable[[], Any], reset: Callable[[], None]) -> int | None:
        if not self.cuda:
            fn()
            return None
        import torch

        reset()
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated() - base

    def launches(self, fn: Callable[[], Any]) -> int | None:
        """The kernels (memory copies and sets too) one warm call of ``fn`` runs on the GPU, by torch's
        profiler; None on the CPU, or where the profiler fails."""
        if not self.cuda:
            return None
        return device_events(fn, cuda=True)

    def ms(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of warm calls, as many as fit ``target_s`` (3 to 25)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        repeats = int(min(25, max(3, self.target_s / max(time.perf_counter() - t0, 1e-6))))
        if not self.cuda:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
            return statistics.median(times)
        import torch

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        self.sync()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def device_events(fn: Callable[[], Any], cuda: bool) -> int | None:
    """The events on the device (``cuda``) or the CPU that torch's profiler records for one call of ``fn``;
    None if the profiler fails."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activity, kind = (ProfilerActivity.CUDA, "CUDA") if cuda else (ProfilerActivity.CPU, "CPU")
    try:
        with profile(activities=[activity]) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == getattr(torch.autograd.DeviceType, kind))
    except Exception:
        return None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "RESOURCE_EXHAUSTED" in str(e)


def free() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_point(
    rows: list[dict[str, Any]], errors: list[str], base: dict[str, Any], body: Callable[[], list[dict]]
) -> None:
    """``body()``'s rows, or one row saying OOM; any other error is recorded (and fails the run)."""
    try:
        rows.extend({**base, **r} for r in body())
    except Exception as e:
        if not is_oom(e):
            errors.append(f"{base}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        rows.append({**base, "loss": "all", "note": "OOM" if is_oom(e) else f"error: {type(e).__name__}"})
    free()


#: The losses of the torch grid: (name, its native loss for the ratios).
TORCH_LOSSES = {
    "multixent": "F.cross_entropy",
    "multixent, strategy compiled": "F.cross_entropy",
    "multixent compiled": "F.cross_entropy compiled",
}


def torch_grid(
    args: argparse.Namespace, device: str, budget: Budget, errors: list[str], sizes: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """multixent against F.cross_entropy at ``sizes``, eager (forward, forward+backward), and where ``sizes``
    hold the compile point, compiled (forward+backward); there also multixent's eager call with its strategy
    compiled (the private ``COMPILED_STRATEGY``: its loss-and-gradient pass through
    ``torch.compile(dynamic=True)``), against the eager native loss."""
    import torch
    import torch.nn.functional as F

    import multixent

    meter = Meter(device == "cuda", 0.05 if args.dry else 0.3)
    rows: list[dict[str, Any]] = []
    points = [(n, c, dt, False) for n, c in sizes for dt in ("float32", "bfloat16")]
    if tuple(args.compile_at) in sizes:
        points += [(*args.compile_at, dt, True) for dt in (["float32"] if args.dry else ["float32", "bfloat16"])]
    for n, c, dtype, compiled in points:
        label = f"torch {n}×{c} {dtype}{' compiled' if compiled else ''}"
        if not budget.allows(label, needs=60.0 if compiled and not args.dry else 0.0):
            continue
        base = {"size": f"{n}×{c}", "dtype": dtype, "logits_bytes": n * c * getattr(torch, dtype).itemsize}
        base["part"] = "compiled" if compiled else "eager"

        def body(n: int = n, c: int = c, dtype: str = dtype, compiled: bool = compiled) -> list[dict[str, Any]]:
            gen = torch.Generator(device).manual_seed(n + c)
            x = torch.randn(n, c, device=device, generator=gen).to(getattr(torch, dtype))
            t = torch.randint(0, c, (n,), device=device, generator=gen)
            xg = x.clone().requires_grad_()
            if compiled:  # the user's torch.compile of each loss; the strategy compiled inside an eager call
                torch._dynamo.reset()
                c_mx, c_native = (
                    torch.compile(f, backend=args.compile_backend, dynamic=False)
                    for f in (multixent.cross_entropy, F.cross_entropy)
                )
                losses = {"multixent compiled": c_mx, "F.cross_entropy compiled": c_native}
                losses["multixent, strategy compiled"] = multixent.cross_entropy
            else:
                losses = {"multixent": multixent.cross_entropy, "F.cross_entropy": F.cross_entropy}
            out = []
            for name, loss in losses.items():

                def step(loss: Callable[..., Any] = loss) -> None:
                    xg.grad = None
                    loss(xg, t).backward()

                passes = [("fwd+bwd", step)] if compiled else [("fwd", lambda loss=loss: loss(x, t)), ("fwd+bwd", step)]
                with strategy_compiled(name == "multixent, strategy compiled"):
                    for kind, fn in passes:
                        t0 = time.perf_counter()
                        meter.sync()
                        fn()  # compile, or warm
                        meter.sync()
                        first = time.perf_counter() - t0
                        peak = meter.peak(fn, reset=lambda: setattr(xg, "grad", None))
                        row = {"pass": kind, "loss": name, "ms": meter.ms(fn), "peak": peak}
                        out.append({**row, "launches": meter.launches(fn)})
                        if compiled:
                            out[-1]["compile_s"] = first
            return out

        run_point(rows, errors, base, body)
    return ratios(rows, native=TORCH_LOSSES)


def ratios(rows: list[dict[str, Any]], native: dict[str, str]) -> list[dict[str, Any]]:
    """Each multixent row's time and peak as multiples of the native loss's at the same point (the same size,
    dtype and pass, in any part of the grid)."""
    key = lambda r: (r.get("size"), r.get("dtype"), r.get("pass"))  # noqa: E731
    by = {(key(r), r["loss"]): r for r in rows if "ms" in r}
    for r in rows:
        other = by.get((key(r), native.get(r.get("loss", ""), "")))
        if other is not None and other is not r and "ms" in r:
            r["x_ms"] = r["ms"] / other["ms"]
            if r.get("peak") is not None and other.get("peak"):
                r["x_peak"] = r["peak"] / other["peak"]
    first = {}  # the points in their order, each pass's losses together
    for r in rows:
        first.setdefault((r.get("size"), r.get("dtype"), r.get("part")), len(first))
    order = lambda r: (first[r.get("size"), r.get("dtype"), r.get("part")], r.get("pass", ""))  # noqa: E731
    return sorted(rows, key=order)


def jax_grid(
    args: argparse.Namespace, device: Any, budget: Budget, errors: list[str], sizes: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """``jax.jit(jax.value_and_grad)`` of multixent's mean loss against optax's at ``sizes``."""
    import jax
    import jax.numpy as jnp

    import multixent

    optax = optional("optax")
    losses = {"multixent": lambda x, t: multixent.cross_entropy(x, t)}
    if optax is not None:
        losses["optax"] = lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x, t).mean()
    rows: list[dict[str, Any]] = []
    target_s = 0.05 if args.dry else 0.3
    for n, c in sizes:
        for dtype in ("float32", "bfloat16"):
            if not budget.allows(f"jax {n}×{c} {dtype}"):
                continue
            base = {
                "size": f"{n}×{c}",
                "dtype": dtype,
                "pass": "fwd+bwd",
                "logits_bytes": n * c * jnp.dtype(dtype).itemsize,
            }

            def body(n: int = n, c: int = c, dtype: str = dtype) -> list[dict[str, Any]]:
                kx, kt = jax.random.split(jax.random.key(n + c))
                x = jax.device_put(jax.random.normal(kx, (n, c), jnp.float32).astype(dtype), device)
                t = jax.device_put(jax.random.randint(kt, (n,), 0, c), device)
                return [
                    {"loss": name, **jax_measure(jax.value_and_grad(loss), (x, t), target_s)}
                    for name, loss in losses.items()
                ]

            run_point(rows, errors, base, body)
    return ratios(rows, native={"multixent": "optax"})


def jax_measure(fn: Callable[..., Any], args: tuple[Any, ...], target_s: float) -> dict[str, Any]:
    """``jax.jit(fn)`` at ``args``: its compile time, its warm median time, and its compiled program's temporaries
    and outputs as the peak (``memory_analysis()``; None where the backend does not report it)."""
    import jax

    t0 = time.perf_counter()
    fn = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    try:
        mem = fn.memory_analysis()
        peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
    except Exception:  # not every backend and version reports it
        peak = None
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    repeats = int(min(25, max(3, target_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times), "peak": peak, "compile_s": compile_s}


def jax_linear_point(args: argparse.Namespace, device: Any, budget: Budget, errors: list[str]) -> list[dict[str, Any]]:
    """``jax.jit(value_and_grad)`` in the hidden states and the classifier of ``linear_cross_entropy`` (the default
    chunks, and 32 chunks) against the logits formed, ``h @ W.T``, and optax's loss (a log-softmax where optax is
    absent), bfloat16. ``peak``: the program's temporaries and outputs; ``beyond grads``: less the gradients."""
    import jax
    import jax.numpy as jnp

    import multixent

    n, d, v = args.linear
    if not budget.allows(f"jax linear_cross_entropy {n}×{d}×{v}"):
        return []
    optax = optional("optax")
    naive_name = "h @ W.T + optax" if optax is not None else "h @ W.T + log_softmax"

    def naive(h: Any, w: Any, t: Any) -> Any:
        logits = h @ w.T
        if optax is not None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], axis=-1))

    chunkings = {"": None, f", chunk_size={-(-n // 32)}": -(-n // 32)}
    losses: dict[str, Callable[..., Any]] = {
        f"multixent.linear_cross_entropy{label}": functools.partial(multixent.linear_cross_entropy, chunk_size=chunk)
        for label, chunk in chunkings.items()
    }
    losses[naive_name] = naive
    base = {"size": f"{n}×{d}×{v}", "dtype": "bfloat16", "pass": "fwd+bwd", "logits_bytes": n * v * 2}
    rows: list[dict[str, Any]] = []

    def body() -> list[dict[str, Any]]:
        kh, kw, kt = jax.random.split(jax.random.key(0), 3)
        h = jax.device_put(jax.random.normal(kh, (n, d), jnp.float32).astype(jnp.bfloat16), device)
        w = jax.device_put((jax.random.normal(kw, (v, d), jnp.float32) / d**0.5).astype(jnp.bfloat16), device)
        t = jax.device_put(jax.random.randint(kt, (n,), 0, v), device)
        grads = (n + v) * d * 2
        out = []
        for name, loss in losses.items():
            row = {
                "loss": name,
                **jax_measure(jax.value_and_grad(loss, argnums=(0, 1)), (h, w, t), 0.05 if args.dry else 0.5),
            }
            row["beyond_grads"] = None if row["peak"] is None else row["peak"] - grads
            out.append(row)
        return out

    run_point(rows, errors, base, body)
    return ratios(rows, native={name: naive_name for name in losses})


def w_bar_in_compute_dtype(on: bool = True) -> contextlib.AbstractContextManager[Any]:
    """``linear_cross_entropy``'s classifier gradient accumulated in float32 (the default), or in the classifier's
    own dtype (the private ``W_BAR_IN_COMPUTE_DTYPE``), for the duration."""
    from multixent import _linear

    return mock.patch.object(_linear, "W_BAR_IN_COMPUTE_DTYPE", on)


def _linear_loss(chunk: int | None, compiled: bool, w_bar_float32: bool = True) -> Callable[..., Any]:
    """``linear_cross_entropy(h, w, t, chunk_size=chunk)`` with its chunks' pass compiled or not (the private
    ``COMPILED_STRATEGY``, read in the forward, where the gradients are computed), ``W̄`` accumulated in float32
    or in bfloat16."""
    import multixent

    def loss(h: Any, w: Any, t: Any) -> Any:
        with strategy_compiled(compiled), w_bar_in_compute_dtype(w_bar_float32):
            return multixent.linear_cross_entropy(h, w, t, chunk_size=chunk)

    return loss


def linear_point(args: argparse.Namespace, device: str, budget: Budget, errors: list[str]) -> list[dict[str, Any]]:
    """linear_cross_entropy's forward+backward against F.linear + F.cross_entropy (and Liger-Kernel, Cut
    Cross-Entropy on CUDA when they import), bfloat16. ``peak``: beyond the inputs; ``beyond grads``: beyond
    the inputs and their gradients."""
    import torch
    import torch.nn.functional as F

    n, d, v = args.linear
    if not budget.allows(f"linear_cross_entropy {n}×{d}×{v}"):
        return []
    # the default chunks, and fewer: W̄ read and written fewer times, larger products (more rows to fill a
    # GPU's matrix tiles), more memory held per chunk; each with the chunks' pass eager, and compiled
    chunkings = {"": None, **{f", chunk_size={-(-n // k)}": -(-n // k) for k in (64, 32, 16)}}
    losses: dict[str, Callable[..., Any]] = {}
    for strategy in ("", ", strategy compiled"):
        for label, chunk in chunkings.items():
            losses[f"multixent.linear_cross_entropy{label}{strategy}"] = _linear_loss(chunk, bool(strategy))
    for label, chunk in chunkings.items():  # W̄ in bfloat16: a V×D float32 buffer less, one rounding per chunk
        losses[f"multixent.linear_cross_entropy{label}, W̄ in bfloat16"] = _linear_loss(chunk, False, False)
    losses["F.linear + F.cross_entropy"] = lambda h, w, t: F.cross_entropy(F.linear(h, w), t)
    ours = list(losses)  # another library's loss that fails is noted in its row, not an error of the run
    liger = optional("liger_kernel.transformers.functional")
    cce = optional("cut_cross_entropy")
    if device == "cuda" and liger is not None:
        losses["Liger-Kernel"] = liger.liger_fused_linear_cross_entropy
    if device == "cuda" and cce is not None:
        losses["Cut Cross-Entropy"] = cce.linear_cross_entropy
    meter = Meter(device == "cuda", 0.05 if args.dry else 0.5)
    base = {"size": f"{n}×{d}×{v}", "dtype": "bfloat16", "pass": "fwd+bwd", "logits_bytes": n * v * 2}
    rows: list[dict[str, Any]] = []

    def body() -> list[dict[str, Any]]:
        gen = torch.Generator(device).manual_seed(0)
        h = torch.randn(n, d, device=device, generator=gen).bfloat16().requires_grad_()
        w = (torch.randn(v, d, device=device, generator=gen) / d**0.5).bfloat16().requires_grad_()
        t = torch.randint(0, v, (n,), device=device, generator=gen)
        grads = (h.numel() + w.numel()) * 2
        w_ref = _w_bar_float32(h, w, t)
        out = []
        for name, loss in losses.items():

            def step(loss: Callable[..., Any] = loss) -> None:
                h.grad = w.grad = None
                value = loss(h, w, t)
                (value[0] if isinstance(value, tuple) else value).backward()

            try:
                step()
                peak = meter.peak(step, reset=lambda: setattr(h, "grad", None) or setattr(w, "grad", None))
                row = {"loss": name, "ms": meter.ms(step), "peak": peak, "launches": meter.launches(step)}
                row["beyond_grads"] = None if peak is None else peak - grads
                if w.grad is None:
                    step()
                row["w_bar_error"] = float((w.grad.float() - w_ref).abs().max() / w_ref.abs().max())
            except Exception as e:
                if name in ours and not is_oom(e):
                    raise
                row = {"loss": name, "note": "OOM" if is_oom(e) else f"error: {type(e).__name__}: {e}"[:200]}
            out.append(row)
            h.grad = w.grad = None
            free()
        return out

    run_point(rows, errors, base, body)
    native = {name: "F.linear + F.cross_entropy" for name in losses}
    return ratios(rows, native=native)


def _w_bar_float32(h: Any, w: Any, t: Any) -> Any:
    """The classifier's gradient of ``F.cross_entropy(F.linear(h, w), t)`` in float32 (of the bfloat16 values):
    the reference of the linear rows' ``W̄`` error (float64 would not fit beside them at the benchmark's size)."""
    import torch.nn.functional as F

    hf, wf = h.detach().float(), w.detach().float().requires_grad_()
    F.cross_entropy(F.linear(hf, wf), t).backward()
    grad = wf.grad
    del hf, wf
    free()
    return grad


# --------------------------------------------------------------------------
# The report


def versions() -> list[str]:
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    lines.append(f"- Python {platform.python_version()}, {platform.platform()}")
    torch = optional("torch")
    if torch is not None and torch.cuda.is_available():
        lines.append(f"- device: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, driver {driver()}")
    else:
        lines.append(f"- device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    names = ["multixent", "numpy", "torch", "triton", "jax", "jaxlib", "optax", "cupy", "array_api_compat"]
    names += ["array_api_extra", "liger_kernel", "cut_cross_entropy"]
    found = []
    for name in names:
        mod = optional(name)
        if mod is not None:
            version = getattr(mod, "__version__", None) or _dist_version(name)
            found.append(f"{name} {version}")
    lines.append(f"- versions: {', '.join(found)}")
    import multixent

    lines.append(f"- multixent from: {Path(multixent.__file__).parent}")
    return lines


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "?"


def driver() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "?"


def parity_section(results: list[dict[str, Any]], notes: list[str]) -> list[str]:
    lines = ["## Parity", "", *notes, ""]
    lines += [
        "| framework | dtype | cases | passed | worst value error | worst gradient error | tolerance | host syncs |"
    ]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["framework"], r["dtype"]), []).append(r)
    for (fw, dtype), rs in groups.items():
        v = max(r["value_err"] for r in rs)
        g = max((r["grad_err"] for r in rs if r["grad_err"] is not None), default=0.0)
        syncs = sum(r["host_syncs"] for r in rs) if "host_syncs" in rs[0] else "not counted"
        cells = f"{len(rs)} | {sum(r['ok'] for r in rs)} | {v:.2e} | {g:.2e} | {TOL[dtype]:g} | {syncs}"
        lines.append(f"| {fw} | {dtype} | {cells} |")
    synced = [r for r in results if r.get("host_syncs")]
    if synced:
        lines += [
            "",
            "Cases with a host synchronisation (CUDA: `torch.cuda.set_sync_debug_mode`; CPU: host reads):",
            "",
        ]
        lines += [f"- {r['framework']} {r['dtype']} {r['case']} {r['reduction']}: {r['host_syncs']}" for r in synced]
    failed = [r for r in results if not r["ok"]]
    if failed:
        lines += ["", "Failed:", ""]
        lines += [
            f"- {r['framework']} {r['dtype']} {r['case']} reduction={r['reduction']}: value {r['value_err']:.2e}, "
            f"gradient {r['grad_err'] if r['grad_err'] is None else format(r['grad_err'], '.2e')}"
            for r in failed
        ]
    return lines


def strategy_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The decision the compiled strategy waits for: its forward+backward time over the eager strategy's, per
    size and dtype (below 1: compiling is faster, and may become the accelerators' default)."""
    eager = {
        (r.get("size"), r.get("dtype")): r["ms"]
        for r in rows
        if r.get("loss") == "multixent" and "ms" in r and r.get("pass") == "fwd+bwd"
    }
    lines = [
        f"- {r['size']} {r['dtype']}: {r['ms'] / eager[r['size'], r['dtype']]:.2f}"
        for r in rows
        if r.get("loss") == "multixent, strategy compiled" and "ms" in r and (r.get("size"), r.get("dtype")) in eager
    ]
    return [
        "The strategy compiled over the eager strategy, forward+backward (below 1: compiling is faster):",
        "",
        *lines,
    ]


def chunk_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The decision the accelerators' default chunk size waits for: each chunking's time over the naive path's
    and its memory beyond the inputs and their gradients over the logits' bytes."""
    naive = [r["w_bar_error"] for r in rows if r.get("loss") == "F.linear + F.cross_entropy" and "w_bar_error" in r]
    naive_error = naive[0] if naive and naive[0] > 0 else float("nan")
    lines = []
    for r in rows:
        if r.get("loss", "").startswith("multixent") and "x_ms" in r:
            beyond = r.get("beyond_grads")
            memory = "—" if beyond is None else f"{beyond / r['logits_bytes']:.3f}"  # (none on the CPU)
            error = r.get("w_bar_error", float("nan")) / naive_error
            figures = f"× naive time {r['x_ms']:.2f}, beyond × logits {memory}, W̄ error × naive {error:.2f}"
            lines.append(f"- {r['loss']}: {figures}")
    return [
        "linear_cross_entropy's chunkings (the bar: time ≤ 1.2× naive, memory beyond ≤ 0.1× logits; W̄'s largest"
        " error against float32, over the naive path's):",
        "",
        *lines,
    ]


def grid_table(title: str, rows: list[dict[str, Any]], ratio_of: str, extra: str | None = None) -> list[str]:
    if not rows:
        return []
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    mib = lambda b: "" if b is None else f"{b / MiB:.1f}"  # noqa: E731
    head = (
        f"| size | dtype | pass | loss | ms | × {ratio_of} | peak beyond inputs MiB | × logits | × {ratio_of} (peak) |"
    )
    head += f" {extra} MiB |" if extra else ""
    head += " launches | compile s | note |"
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peak = r.get("peak")
        x_logits = None if peak is None else peak / r["logits_bytes"]
        cells = [r.get("size"), r.get("dtype"), r.get("pass", ""), r.get("loss"), fmt(r.get("ms"), ".3f")]
        cells += [fmt(r.get("x_ms"), ".2f"), mib(peak), fmt(x_logits, ".3f"), fmt(r.get("x_peak"), ".2f")]
        cells += [mib(r.get("beyond_grads"))] if extra else []
        cells += [fmt(r.get("launches"), "d"), fmt(r.get("compile_s"), ".1f"), r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU, the accelerator strategy forced")
    parser.add_argument("--out", type=Path, help=f"the report (default {DEFAULT_OUT}; with --dry a temporary file)")
    parser.add_argument("--budget", type=float, help="seconds, after which the remaining points are skipped")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp()) / "gpu.md" if args.dry else DEFAULT_OUT
    if args.dry and args.out.resolve() == DEFAULT_OUT.resolve():
        parser.error(f"--dry never writes {DEFAULT_OUT}: its figures are not a GPU's")
    args.budget = args.budget or (150.0 if args.dry else 210.0)
    args.grid = DRY_GRID if args.dry else GRID
    args.compile_at, args.linear = (DRY_COMPILE_AT, DRY_LINEAR) if args.dry else (COMPILE_AT, LINEAR)
    args.compile_backend = "aot_eager" if args.dry else "inductor"
    parity_shape, passes_at = (DRY_PARITY_SHAPE, DRY_PASSES_AT) if args.dry else (PARITY_SHAPE, PASSES_AT)
    linear_parity = DRY_LINEAR_PARITY if args.dry else LINEAR_PARITY
    budget = Budget(args.budget)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch: no 75% grab of the GPU
    sys.path.insert(0, str(ROOT))  # the checkout's multixent

    import multixent._compat

    torch = optional("torch")
    if not args.dry and (torch is None or not torch.cuda.is_available()):
        parser.error("no CUDA device for torch: run with --dry for the CPU check")
    device = "cpu" if args.dry else "cuda"
    if args.dry:
        multixent._compat.ACCELERATOR_ON_CPU = True  # the strategy that accelerators take, on CPU tensors
    jax, jax_device = optional("jax"), None
    if jax is not None:
        with contextlib.suppress(RuntimeError):
            jax_device = jax.devices("cpu" if args.dry else "gpu")[0]
    cupy = None if args.dry else optional("cupy")
    if cupy is not None:
        try:
            cupy = cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
        except Exception:
            cupy = None

    errors: list[str] = []
    results: list[dict[str, Any]] = []
    notes = [
        f"{parity_shape[0]}×{parity_shape[1]}; each case's error is the largest difference relative to the"
        " oracle's largest magnitude, for the value and the gradient."
    ]
    title = (
        "multixent's GPU check, dry run on the CPU: tiny sizes, not a measurement" if args.dry else "multixent on a GPU"
    )
    header = versions()
    passes: list[str] = []
    torch_rows: list[dict[str, Any]] = []
    linear_rows: list[dict[str, Any]] = []
    jax_rows: list[dict[str, Any]] = []
    jax_linear_rows: list[dict[str, Any]] = []

    def parity(name: str, stage: Callable[[], list[dict[str, Any]]], present: bool) -> Callable[[], None]:
        def run() -> None:
            if not present:
                notes.append(f"- {name}: skipped (not importable, or no GPU for it)")
                return
            t0 = time.perf_counter()
            try:
                results.extend(stage())
            except Exception as e:
                errors.append(f"parity {name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
            notes.append(f"- {name}: {time.perf_counter() - t0:.1f} s")

        return run

    def count_passes() -> None:
        try:
            forced = "" if device == "cuda" else " (the accelerator strategy forced on CPU tensors)"
            passes[:] = [
                "## Passes: eager operations, counted" + forced,
                "",
                load_passes().table(*passes_at, device=device),
            ]
        except Exception as e:
            errors.append(f"passes: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")

    def sections() -> list[str]:
        torch_table = grid_table(
            "## torch: cross_entropy against F.cross_entropy", ratios(torch_rows, TORCH_LOSSES), "native"
        )
        title_linear = "## linear_cross_entropy against F.linear + F.cross_entropy (bfloat16)"
        linear_table = grid_table(title_linear, linear_rows, "naive", extra="beyond inputs and their gradients")
        jax_table = grid_table(
            "## JAX: jit(value_and_grad), mean, against optax", ratios(jax_rows, {"multixent": "optax"}), "optax"
        )
        out = [*passes]
        out += ["", *torch_table, "", *strategy_lines(torch_rows)] if torch_rows else []
        out += ["", *linear_table, "", *chunk_lines(linear_rows)] if linear_rows else []
        jax_note = "JAX's peak: the compiled program's temporaries and outputs (`memory_analysis()`)."
        out += ["", *jax_table, "", jax_note] if jax_rows else []
        title_jax_linear = "## JAX: jit(value_and_grad) of linear_cross_entropy against the logits formed (bfloat16)"
        jax_linear_table = grid_table(
            title_jax_linear, jax_linear_rows, "naive", extra="beyond inputs and their gradients"
        )
        out += ["", *jax_linear_table, "", jax_note] if jax_linear_rows else []
        return out

    def write(done: str) -> None:
        """The report so far (written after each part: a run stopped midway leaves what it measured)."""
        elapsed = time.perf_counter() - budget.start
        report = [f"# {title}", "", *header, f"- total: {elapsed:.0f} s (budget {args.budget:.0f} s)", ""]
        report += parity_section(results, notes)
        report += ["", *sections(), ""]
        if budget.skipped:
            report += ["## Skipped: over the time budget", "", *[f"- {s}" for s in budget.skipped], ""]
        if errors:
            report += ["## Errors", "", "```", *errors, "```", ""]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))
        print(f"{done}: {elapsed:.0f} s", flush=True)

    # What the decisions wait for first (the compile point, linear_cross_entropy), so that a run cut short by
    # its budget or its machine's time still leaves them; the rest of the grid last.
    key = [tuple(args.compile_at)]
    rest = [size for size in args.grid if tuple(size) not in key]

    def torch_at(sizes: list[Any]) -> Callable[[], None]:
        return lambda: torch_rows.extend(torch_grid(args, device, budget, errors, sizes))

    def jax_at(sizes: list[Any]) -> Callable[[], None]:
        return lambda: jax_rows.extend(jax_grid(args, jax_device, budget, errors, sizes))

    has_torch, has_jax, has_cupy = torch is not None, jax_device is not None, cupy is not None
    compiled_cases = 1 if args.dry else 4
    steps: list[tuple[str, Callable[[], None], bool]] = [  # (name, step, whether it runs)
        ("parity torch", parity("torch", lambda: parity_torch(device, parity_shape, compiled_cases), has_torch), True),
        (
            "parity linear",
            parity("torch linear_cross_entropy", lambda: parity_linear(device, linear_parity), has_torch),
            True,
        ),
        ("passes", count_passes, has_torch),
        ("torch grid, compile point", torch_at(key), has_torch),
        ("linear", lambda: linear_rows.extend(linear_point(args, device, budget, errors)), has_torch),
        ("parity jax", parity("jax", lambda: parity_jax(jax_device, parity_shape), has_jax), True),
        ("parity cupy", parity("cupy", lambda: parity_array_api(cupy, "cupy", parity_shape), has_cupy), True),
        (
            "parity numpy",
            parity("numpy (standing in for CuPy)", lambda: parity_array_api(np, "numpy", parity_shape), True),
            args.dry,
        ),
        ("jax grid, compile point", jax_at(key), has_jax),
        (
            "parity jax linear",
            parity(
                "jax linear_cross_entropy", lambda: parity_jax_linear(jax_device, linear_parity), has_jax and has_torch
            ),
            True,
        ),
        ("jax linear", lambda: jax_linear_rows.extend(jax_linear_point(args, jax_device, budget, errors)), has_jax),
        ("torch grid, the rest", torch_at(rest), has_torch),
        ("jax grid, the rest", jax_at(rest), has_jax),
    ]
    for done, step, wanted in steps:
        if wanted:
            step()
            free()
            write(done)
    print(f"parity: {sum(r['ok'] for r in results)}/{len(results)} passed", flush=True)
    print(f"report: {args.out}")
    failed = [r for r in results if not r["ok"]]
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if failed or errors or not results else 0


if __name__ == "__main__":
    sys.exit(main())
