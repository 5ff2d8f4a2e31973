"""Benchmark of multixent's cross-entropy (class-index targets, mean reduction) against native losses.

    python benchmarks/bench.py            # the default sweep (nox -s bench runs this)
    python benchmarks/bench.py --quick    # only the acceptance point of issue 3
    python benchmarks/bench.py --only torch --only numpy --N 4096 --C 8000 32000

Compared, for forward and forward+backward:

* torch eager: ``multixent.cross_entropy`` vs ``torch.nn.functional.cross_entropy``, and both
  under ``torch.compile`` (compiled once per shape, warmed up, then timed);
* JAX under ``jax.jit``: multixent vs ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``
  (forward, and ``jax.value_and_grad``);
* NumPy (fp32): ``multixent.cross_entropy`` vs ``scipy.special.log_softmax`` + ``take_along_axis``,
  and ``multixent.cross_entropy_and_grad`` against multixent's own forward.

Times are medians of alternating rounds in this process (see ``_measure.time_interleaved``).
Memory is the peak extra RSS beyond the inputs in a fresh process per measurement for torch and
NumPy (``_measure.peak_extra_rss``), and ``memory_analysis()`` (temp + output) for JAX, both
divided by the logits' bytes. Writes ``results/results.md``, ``results/results.json`` and
``results/cross_entropy.png`` and prints the acceptance items of issue 3 with PASS/FAIL.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import _measure as M

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "multixent"

#: The acceptance point of issue 3: N rows, C classes, fp32, forward+backward.
ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE = 4096, 32000, "float32"
DEFAULT_N = (512, 4096)
DEFAULT_C = (100, 1000, 8000, 32000, 131072)
DEFAULT_DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("torch", "jax", "numpy")

#: Acceptance limits (issue 3).
LIMIT_TIME = 1.0
LIMIT_MEMORY = 1.05
LIMIT_AND_GRAD = 1.5

ITEMSIZE = {"float32": 4, "bfloat16": 2}

#: Fresh processes per RSS figure at the acceptance point (the least is reported; see _memory_rss).
MEMORY_REPEATS = 3


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Inputs and the losses compared (module-level so the memory worker can import them)


def torch_inputs(n: int, c: int, dtype: str, seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (2.0 * torch.randn(n, c, generator=g)).to(getattr(torch, dtype))
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


def torch_loss(impl: str) -> Callable[[Any, Any], Any]:
    if impl == "multixent":
        import multixent

        return multixent.cross_entropy
    import torch.nn.functional as F

    return F.cross_entropy


def jax_inputs(n: int, c: int, dtype: str, seed: int = 0) -> tuple[Any, Any]:
    import jax
    import jax.numpy as jnp

    kx, ky = jax.random.split(jax.random.key(seed))
    x = (2.0 * jax.random.normal(kx, (n, c), jnp.float32)).astype(getattr(jnp, dtype))
    y = jax.random.randint(ky, (n,), 0, c, dtype=jnp.int32)
    return jax.block_until_ready(x), jax.block_until_ready(y)


def jax_loss(impl: str) -> Callable[[Any, Any], Any]:
    if impl == "multixent":
        import multixent

        def mx(x: Any, y: Any) -> Any:
            return multixent.cross_entropy(x, y)

        return mx
    import optax

    def native(x: Any, y: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    return native


def numpy_inputs(n: int, c: int, seed: int = 0) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c), dtype=np.float32)
    x *= 2.0
    y = rng.integers(0, c, n)
    return x, y


def scipy_cross_entropy(x: Any, y: Any) -> Any:
    """The native NumPy reference: ``-mean(take_along_axis(log_softmax(x), y))``."""
    import numpy as np
    from scipy.special import log_softmax

    return -np.take_along_axis(log_softmax(x, axis=-1), y[:, None], axis=-1).mean()


def numpy_fn(impl: str) -> Callable[[Any, Any], Any]:
    import multixent

    return {
        "multixent": multixent.cross_entropy,
        "multixent and_grad": multixent.cross_entropy_and_grad,
        "scipy": scipy_cross_entropy,
    }[impl]


# Memory-worker factories: create and touch the inputs, return run() (see _measure.peak_extra_rss).


def torch_memory_case(impl: str, n: int, c: int, dtype: str, passes: str, threads: int = 2) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    f = torch_loss(impl)
    x, y = torch_inputs(n, c, dtype)
    if passes == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return f(x, y)

        return fwd
    x.requires_grad_(True)

    def fwd_bwd() -> Any:
        f(x, y).backward()
        return x.grad

    return fwd_bwd


def numpy_memory_case(impl: str, n: int, c: int, dtype: str = "float32", passes: str = "") -> Callable[[], Any]:
    assert dtype == "float32", "the NumPy comparison is fp32 only"
    f = numpy_fn(impl)
    x, y = numpy_inputs(n, c)
    return lambda: f(x, y)


def _warmup_rows(n: int, c: int) -> int:
    """Rows of the tiny warm-up call of a memory worker: ~2**18 elements, at most n/16 rows."""
    return max(1, min(n // 16, 2**18 // c))


# ------------------------------------------------------------------------------------------------
# The sweep


class Results:
    """Flat lists of time / ratio / memory records, saved as JSON after every step."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.times: list[dict[str, Any]] = []
        self.ratios: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.compile: list[dict[str, Any]] = []

    def add_timings(
        self, framework: str, n: int, c: int, dtype: str, passes: str, timings: dict[str, M.Timing]
    ) -> None:
        load = M.load_average()
        for impl, t in timings.items():
            self.times.append(
                {"framework": framework, "N": n, "C": c, "dtype": dtype, "pass": passes, "impl": impl, "load": load}
                | t.as_dict()
            )

    def add_ratio(
        self, framework: str, n: int, c: int, dtype: str, passes: str, a: str, b: str, timings: dict[str, M.Timing]
    ) -> float:
        r = M.ratio(timings[a], timings[b])
        self.ratios.append(
            {
                "framework": framework,
                "N": n,
                "C": c,
                "dtype": dtype,
                "pass": passes,
                "numerator": a,
                "denominator": b,
                "ratio": r,
                "paired_ratio": M.paired_ratio(timings[a], timings[b]),
                "numerator_ms": timings[a].median * 1e3,
                "denominator_ms": timings[b].median * 1e3,
                "rounds": len(timings[a].samples),
                "capped": timings[a].capped,
            }
        )
        return r

    def add_memory(self, record: dict[str, Any]) -> None:
        self.memory.append(record)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "meta": self.meta,
            "ratios": self.ratios,
            "memory": self.memory,
            "compile": self.compile,
            "times": self.times,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)


def _ms(t: M.Timing) -> str:
    return f"{t.median * 1e3:.3g} ms"


def _time(args: argparse.Namespace, cases: dict[str, Callable[[], Any]]) -> dict[str, M.Timing]:
    return M.time_interleaved(
        cases,
        rounds=args.rounds,
        warmup=args.warmup,
        min_sample_s=args.min_sample,
        max_rounds=args.max_rounds,
        max_spread=args.max_spread,
        extra_budget_s=args.extra_budget,
        slow_call_s=args.slow_call,
        slow_rounds=args.slow_rounds,
    )


def _timed(
    res: Results,
    args: argparse.Namespace,
    framework: str,
    n: int,
    c: int,
    dtype: str,
    passes: str,
    cases: dict[str, Callable[[], Any]],
) -> dict[str, M.Timing]:
    t = _time(args, cases)
    res.add_timings(framework, n, c, dtype, passes, t)
    names = list(cases)
    r = res.add_ratio(framework, n, c, dtype, passes, names[0], names[1], t)
    _log(
        f"  {framework:13s} {passes:8s} {names[0]} {_ms(t[names[0]])} / {names[1]} {_ms(t[names[1]])}"
        f" = {r:.3f}  (paired {res.ratios[-1]['paired_ratio']:.3f}, {len(t[names[0]].samples)} rounds"
        f"{' CAPPED: slow' if t[names[0]].capped else ''},"
        f" spread {max(v.spread for v in t.values()):.0%}, load {M.load_average()[0]})"
    )
    res.save()
    return t


def _memory_rss(
    res: Results, framework: str, factory: str, impl: str, n: int, c: int, dtype: str, passes: str, **extra: Any
) -> None:
    """Peak extra RSS; at the acceptance point the least of ``MEMORY_REPEATS`` fresh processes.

    The noise is one-sided: the kernel's reclaim on this shared machine re-faults pages
    that then count as resident, so a repeat can only read more than the code needs.
    Every reading is recorded (``extra_bytes_all``).
    """
    kwargs = {"impl": impl, "n": n, "c": c, "dtype": dtype, "passes": passes, **extra}
    warm = {**kwargs, "n": _warmup_rows(n, c)}
    repeats = MEMORY_REPEATS if (n, c, dtype) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE) else 1
    runs = [M.peak_extra_rss(factory, kwargs, warmup_kwargs=warm) for _ in range(repeats)]
    out = min(runs, key=lambda r: r["extra_bytes"])
    out["extra_bytes_all"] = [r["extra_bytes"] for r in runs]
    logits = n * c * ITEMSIZE[dtype]
    res.add_memory(
        {
            "framework": framework,
            "method": "peak RSS",
            "N": n,
            "C": c,
            "dtype": dtype,
            "pass": passes,
            "impl": impl,
            "logits_bytes": logits,
            "ratio": out["extra_bytes"] / logits,
        }
        | out
    )
    _log(
        f"  {framework:13s} memory {passes:9s} {impl:19s} extra {out['extra_bytes'] / 2**20:8.1f} MiB"
        f" = {out['extra_bytes'] / logits:.3f} x logits (retained {out['retained_bytes'] / logits:.3f} x)"
    )
    res.save()


def _call(f: Callable[..., Any], x: Any, y: Any) -> Callable[[], Any]:
    """``f(x, y)`` as a zero-argument case."""
    return lambda: f(x, y)


def _backward(f: Callable[..., Any], x: Any, y: Any) -> Callable[[], Any]:
    """``x.grad = None; f(x, y).backward()`` as a zero-argument case (the grad is not accumulated)."""

    def run() -> None:
        x.grad = None
        f(x, y).backward()

    return run


def _jax_call(f: Callable[..., Any], x: Any, y: Any) -> Callable[[], Any]:
    import jax

    return lambda: jax.block_until_ready(f(x, y))


def run_torch(res: Results, args: argparse.Namespace, configs: list[tuple[int, int, str]]) -> None:
    import torch

    warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")
    warnings.filterwarnings("ignore", message=r".*Dynamo.*")
    torch.set_num_threads(args.threads)
    impls = ("multixent", "native")
    for n, c, dtype in configs:
        _log(f"torch N={n} C={c} {dtype}")
        x, y = torch_inputs(n, c, dtype)
        xr = x.clone().requires_grad_(True)

        losses = {impl: torch_loss(impl) for impl in impls}
        _timed(res, args, "torch eager", n, c, dtype, "fwd", {i: _call(f, x, y) for i, f in losses.items()})
        _timed(res, args, "torch eager", n, c, dtype, "fwd+bwd", {i: _backward(f, xr, y) for i, f in losses.items()})

        if _want_compile(args, n, c, dtype):
            torch._dynamo.reset()
            comp_f: dict[str, Callable[[], Any]] = {}
            comp_fb: dict[str, Callable[[], Any]] = {}
            for impl, f in losses.items():
                for passes, dest in (("fwd", comp_f), ("fwd+bwd", comp_fb)):
                    cf = torch.compile(f, dynamic=False)
                    run = _call(cf, x, y) if passes == "fwd" else _backward(cf, xr, y)
                    t0 = time.perf_counter()
                    run()
                    dt = time.perf_counter() - t0
                    res.compile.append(
                        {
                            "framework": "torch.compile",
                            "N": n,
                            "C": c,
                            "dtype": dtype,
                            "pass": passes,
                            "impl": impl,
                            "first_call_s": dt,
                        }
                    )
                    dest[impl] = run
            _timed(res, args, "torch.compile", n, c, dtype, "fwd", comp_f)
            _timed(res, args, "torch.compile", n, c, dtype, "fwd+bwd", comp_fb)
            del comp_f, comp_fb
            torch._dynamo.reset()
        del x, xr, y
        gc.collect()

        if _want_memory(args, n, c, dtype):
            for impl in impls:
                _memory_rss(
                    res,
                    "torch eager",
                    "bench:torch_memory_case",
                    impl,
                    n,
                    c,
                    dtype,
                    "fwd+bwd",
                    threads=args.threads,
                )
            if (n, c, dtype) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE):
                for impl in impls:
                    _memory_rss(
                        res,
                        "torch eager",
                        "bench:torch_memory_case",
                        impl,
                        n,
                        c,
                        dtype,
                        "fwd",
                        threads=args.threads,
                    )


def run_jax(res: Results, args: argparse.Namespace, configs: list[tuple[int, int, str]]) -> None:
    import jax

    impls = {"multixent": jax_loss("multixent"), "optax": jax_loss("optax")}
    for n, c, dtype in configs:
        _log(f"jax N={n} C={c} {dtype}")
        x, y = jax_inputs(n, c, dtype)
        logits = n * c * ITEMSIZE[dtype]
        cases: dict[str, dict[str, Callable[[], Any]]] = {"fwd": {}, "fwd+bwd": {}}
        for impl, f in impls.items():
            for passes, g in (("fwd", f), ("fwd+bwd", jax.value_and_grad(f))):
                jitted = jax.jit(g)
                t0 = time.perf_counter()
                jax.block_until_ready(jitted(x, y))
                res.compile.append(
                    {
                        "framework": "jax.jit",
                        "N": n,
                        "C": c,
                        "dtype": dtype,
                        "pass": passes,
                        "impl": impl,
                        "first_call_s": time.perf_counter() - t0,
                    }
                )
                cases[passes][impl] = _jax_call(jitted, x, y)
                stats = M.xla_memory(g, x, y)
                extra = stats["temp_size_in_bytes"] + stats["output_size_in_bytes"]
                res.add_memory(
                    {
                        "framework": "jax.jit",
                        "method": "memory_analysis",
                        "N": n,
                        "C": c,
                        "dtype": dtype,
                        "pass": passes,
                        "impl": impl,
                        "logits_bytes": logits,
                        "extra_bytes": extra,
                        "ratio": extra / logits,
                    }
                    | stats
                )
        for passes in ("fwd", "fwd+bwd"):
            mx, nat = (m for m in res.memory[-4:] if m["pass"] == passes)
            _log(f"  jax.jit       memory {passes:8s} multixent {mx['ratio']:.3f} x logits, optax {nat['ratio']:.3f} x")
        _timed(res, args, "jax.jit", n, c, dtype, "fwd", cases["fwd"])
        _timed(res, args, "jax.jit", n, c, dtype, "fwd+bwd", cases["fwd+bwd"])
        del cases, x, y
        jax.clear_caches()
        gc.collect()


def run_numpy(res: Results, args: argparse.Namespace, configs: list[tuple[int, int, str]]) -> None:
    for n, c, dtype in configs:
        if dtype != "float32":
            continue
        _log(f"numpy N={n} C={c} {dtype}")
        x, y = numpy_inputs(n, c)
        fns = {impl: numpy_fn(impl) for impl in ("multixent", "scipy", "multixent and_grad")}
        cases = {impl: _call(f, x, y) for impl, f in fns.items()}
        t = _time(args, cases)
        res.add_timings("numpy", n, c, dtype, "fwd", {k: v for k, v in t.items() if k != "multixent and_grad"})
        res.add_timings("numpy", n, c, dtype, "and_grad", {"multixent and_grad": t["multixent and_grad"]})
        r_fwd = res.add_ratio("numpy", n, c, dtype, "fwd", "multixent", "scipy", t)
        r_ag = res.add_ratio("numpy", n, c, dtype, "and_grad/fwd", "multixent and_grad", "multixent", t)
        res.add_ratio("numpy", n, c, dtype, "and_grad/scipy fwd", "multixent and_grad", "scipy", t)
        _log(
            f"  numpy         fwd multixent {_ms(t['multixent'])} / scipy {_ms(t['scipy'])} = {r_fwd:.3f};"
            f" and_grad {_ms(t['multixent and_grad'])} = {r_ag:.3f} x multixent fwd (load {M.load_average()[0]})"
        )
        res.save()
        del x, y, cases
        gc.collect()
        if _want_memory(args, n, c, dtype):
            for impl, passes in (("multixent", "fwd"), ("multixent and_grad", "and_grad"), ("scipy", "fwd")):
                _memory_rss(res, "numpy", "bench:numpy_memory_case", impl, n, c, dtype, passes)


def _want_compile(args: argparse.Namespace, n: int, c: int, dtype: str) -> bool:
    if args.compile == "none":
        return False
    if args.compile == "all" or (n, c, dtype) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE):
        return True
    if args.compile == "fp32":
        return dtype == "float32"
    return dtype == "float32" and n == max(args.ns)  # "fp32-largest-n"


def _want_memory(args: argparse.Namespace, n: int, c: int, dtype: str) -> bool:
    if args.no_memory:
        return False
    return n * c * ITEMSIZE[dtype] >= args.mem_min_mib * 2**20 or (n, c, dtype) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE)


# ------------------------------------------------------------------------------------------------
# Acceptance, Markdown, plot


def _find(records: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def acceptance(res: Results) -> list[dict[str, Any]]:
    """The measurable acceptance items of issue 3 at the acceptance point, with PASS/FAIL."""
    at = {"N": ACCEPT_N, "C": ACCEPT_C, "dtype": ACCEPT_DTYPE}
    items: list[tuple[str, str, dict[str, Any] | None, str, float | None]] = [
        (
            "1",
            "torch eager fwd+bwd time, multixent / F.cross_entropy",
            _find(res.ratios, framework="torch eager", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            LIMIT_TIME,
        ),
        (
            "1",
            "torch eager fwd+bwd peak extra memory / logits bytes (multixent)",
            _find(res.memory, framework="torch eager", impl="multixent", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            LIMIT_MEMORY,
        ),
        (
            "2",
            "jax.jit value_and_grad time, multixent / optax",
            _find(res.ratios, framework="jax.jit", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            LIMIT_TIME,
        ),
        (
            "2",
            "jax.jit value_and_grad (temp+output) / logits bytes (multixent)",
            _find(res.memory, framework="jax.jit", impl="multixent", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            LIMIT_MEMORY,
        ),
        (
            "3",
            "numpy forward time, multixent / scipy log_softmax+take_along_axis",
            _find(res.ratios, framework="numpy", **at, **{"pass": "fwd"}),
            "ratio",
            LIMIT_TIME,
        ),
        (
            "3",
            "numpy cross_entropy_and_grad time / multixent forward",
            _find(res.ratios, framework="numpy", **at, **{"pass": "and_grad/fwd"}),
            "ratio",
            LIMIT_AND_GRAD,
        ),
        (
            "info",
            "torch.compile fwd+bwd time, multixent / F.cross_entropy",
            _find(res.ratios, framework="torch.compile", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            None,
        ),
        (
            "info",
            "torch eager fwd+bwd peak extra memory / logits bytes (F.cross_entropy)",
            _find(res.memory, framework="torch eager", impl="native", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            None,
        ),
        (
            "info",
            "jax.jit value_and_grad (temp+output) / logits bytes (optax)",
            _find(res.memory, framework="jax.jit", impl="optax", **at, **{"pass": "fwd+bwd"}),
            "ratio",
            None,
        ),
        (
            "info",
            "numpy cross_entropy_and_grad peak extra memory / logits bytes",
            _find(res.memory, framework="numpy", impl="multixent and_grad", **at),
            "ratio",
            None,
        ),
        (
            "info",
            "numpy scipy forward peak extra memory / logits bytes",
            _find(res.memory, framework="numpy", impl="scipy", **at),
            "ratio",
            None,
        ),
    ]
    out = []
    for item, what, rec, key, limit in items:
        value = None if rec is None else rec[key]
        if value is None:
            verdict = "not measured"
        elif limit is None:
            verdict = "info"
        else:
            verdict = "PASS" if value <= limit else "FAIL"
        extra = ""
        if rec is not None and "paired_ratio" in rec:
            extra = f"paired {rec['paired_ratio']:.3f}; {rec['numerator_ms']:.1f} ms vs {rec['denominator_ms']:.1f} ms"
        out.append({"item": item, "what": what, "value": value, "limit": limit, "verdict": verdict, "detail": extra})
    out.append(
        {
            "item": "4",
            "what": "adapters equal the native loss (test suite)",
            "value": None,
            "limit": None,
            "verdict": "not measured here (nox -s tests)",
            "detail": "",
        }
    )
    out.append(
        {
            "item": "5",
            "what": "README table and plot from nox -s bench",
            "value": None,
            "limit": None,
            "verdict": "not measured here",
            "detail": "",
        }
    )
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _fms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _time_table(res: Results, framework: str, passes: tuple[str, ...], labels: tuple[str, str]) -> list[str]:
    keys = sorted(
        {(r["N"], r["C"], r["dtype"]) for r in res.ratios if r["framework"] == framework},
        key=lambda k: (k[2] != "float32", k[0], k[1]),
    )
    if not keys:
        return []
    head = "| N | C | dtype |"
    sep = "|---:|---:|:---|"
    for p in passes:
        head += f" {p}: {labels[0]} ms | {labels[1]} ms | ratio |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for n, c, dtype in keys:
        row = f"| {n} | {c} | {dtype} |"
        for p in passes:
            r = _find(res.ratios, framework=framework, N=n, C=c, dtype=dtype, **{"pass": p})
            if r is None:
                row += " — | — | — |"
            else:
                mark = "†" if r.get("capped") else ""
                row += f" {_fms(r['numerator_ms'])} | {_fms(r['denominator_ms'])} | **{r['ratio']:.2f}**{mark} |"
        lines.append(row)
    return lines


def write_markdown(res: Results, path: Path, acc: list[dict[str, Any]]) -> None:
    meta = res.meta
    lines = [
        "# multixent cross-entropy benchmark",
        "",
        "Cross-entropy with class-index targets, mean reduction. Ratios are multixent / native "
        "(below 1 is better for multixent). Times: median of "
        f"{meta['args']['rounds']} to {meta['args']['max_rounds']} alternating rounds (more while the interquartile "
        f"spread exceeds {meta['args']['max_spread']:.0%}) after {meta['args']['warmup']} warm-up calls, "
        f"torch with {meta['args']['threads']} threads; `paired` ratios are medians of the per-round ratios. "
        "Memory: peak extra bytes beyond the inputs ÷ the logits' bytes (RSS at the acceptance point: the least of "
        f"{meta['args'].get('memory_repeats', 1)} fresh processes).",
        "",
        f"- Machine: {M.describe_machine(meta['machine'])}",
        f"- Command: `{meta['command']}`",
        f"- Code: multixent at `{meta['git']['describe']}`",
        f"- Date: {meta['started']}; wall time {meta.get('wall_s', 0) / 60:.1f} min; "
        f"load average at start {meta['machine']['load_average_start']}, at end {meta.get('load_average_end')}",
        "",
    ]
    if meta.get("source_sha256_end") not in (None, meta.get("source_sha256")):
        lines += ["**Warning: multixent's source changed during this run; the numbers mix code versions.**", ""]
    for e in meta.get("errors", []):
        last = e["traceback"].strip().splitlines()[-1]
        lines += [f"**The {e['framework']} section failed:** `{last}` (traceback in results.json).", ""]
    lines += [
        f"## Acceptance (issue 3: N={ACCEPT_N}, C={ACCEPT_C}, {ACCEPT_DTYPE}, forward+backward)",
        "",
        "| item | measured | value | limit | result | detail |",
        "|:---|:---|---:|---:|:---|:---|",
    ]
    for a in acc:
        lim = "—" if a["limit"] is None else f"≤ {a['limit']}"
        lines.append(f"| {a['item']} | {a['what']} | {_fmt(a['value'])} | {lim} | {a['verdict']} | {a['detail']} |")
    lines += ["", "## Time (median ms; ratio = multixent / native)", ""]
    if any(r.get("capped") for r in res.ratios):
        lines += [
            f"† a call took over {meta['args']['slow_call']} s in warm-up, so only {meta['args']['slow_rounds']}"
            " rounds were timed.",
            "",
        ]
    for fw, native in (("torch eager", "F.cross_entropy"), ("torch.compile", "F.cross_entropy"), ("jax.jit", "optax")):
        table = _time_table(res, fw, ("fwd", "fwd+bwd"), ("multixent", native))
        if table:
            lines += [f"### {fw} (native: {native})", "", *table, ""]
    keys = sorted({(r["N"], r["C"]) for r in res.ratios if r["framework"] == "numpy"})
    if keys:
        lines += [
            "### numpy, float32 (native: `scipy.special.log_softmax` + `take_along_axis`)",
            "",
            "| N | C | multixent fwd ms | scipy fwd ms | fwd ratio | and_grad ms | and_grad / multixent fwd |"
            " and_grad / scipy fwd |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, c in keys:
            f = _find(res.ratios, framework="numpy", N=n, C=c, **{"pass": "fwd"})
            g = _find(res.ratios, framework="numpy", N=n, C=c, **{"pass": "and_grad/fwd"})
            s = _find(res.ratios, framework="numpy", N=n, C=c, **{"pass": "and_grad/scipy fwd"})
            assert f and g and s
            lines.append(
                f"| {n} | {c} | {_fms(f['numerator_ms'])} | {_fms(f['denominator_ms'])} | **{f['ratio']:.2f}** |"
                f" {_fms(g['numerator_ms'])} | **{g['ratio']:.2f}** | {s['ratio']:.2f} |"
            )
        lines.append("")
    lines += ["## Peak extra memory ÷ logits bytes", ""]
    tm = [m for m in res.memory if m["framework"] == "torch eager"]
    if tm:
        lines += [
            "### torch eager (peak RSS beyond the inputs in a fresh process; includes the 1× `.grad`)",
            "",
            "| N | C | dtype | logits MiB | pass | multixent | F.cross_entropy |",
            "|---:|---:|:---|---:|:---|---:|---:|",
        ]
        for n, c, dtype, p in sorted(
            {(m["N"], m["C"], m["dtype"], m["pass"]) for m in tm},
            key=lambda k: (k[2] != "float32", k[3] != "fwd+bwd", k[0], k[1]),
        ):
            a = _find(tm, N=n, C=c, dtype=dtype, impl="multixent", **{"pass": p})
            b = _find(tm, N=n, C=c, dtype=dtype, impl="native", **{"pass": p})
            mib = n * c * ITEMSIZE[dtype] / 2**20
            lines.append(
                f"| {n} | {c} | {dtype} | {mib:.1f} | {p} | {_fmt(a and a['ratio'], 2)} | {_fmt(b and b['ratio'], 2)} |"
            )
        lines.append("")
    nm = [m for m in res.memory if m["framework"] == "numpy"]
    if nm:
        lines += [
            "### numpy, float32 (peak RSS beyond the inputs in a fresh process)",
            "",
            "| N | C | logits MiB | multixent fwd | multixent and_grad | scipy fwd |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n, c in sorted({(m["N"], m["C"]) for m in nm}):
            vals = [_find(nm, N=n, C=c, impl=i) for i in ("multixent", "multixent and_grad", "scipy")]
            lines.append(
                f"| {n} | {c} | {n * c * 4 / 2**20:.1f} | " + " | ".join(_fmt(v and v["ratio"], 2) for v in vals) + " |"
            )
        lines.append("")
    jm = [m for m in res.memory if m["framework"] == "jax.jit"]
    if jm:
        lines += [
            "### jax.jit (`memory_analysis()`: temp + output bytes)",
            "",
            "| N | C | dtype | logits MiB | value_and_grad: multixent | optax | fwd: multixent | optax |",
            "|---:|---:|:---|---:|---:|---:|---:|---:|",
        ]
        for n, c, dtype in sorted(
            {(m["N"], m["C"], m["dtype"]) for m in jm}, key=lambda k: (k[2] != "float32", k[0], k[1])
        ):
            vals = [
                _find(jm, N=n, C=c, dtype=dtype, impl=i, **{"pass": p})
                for p in ("fwd+bwd", "fwd")
                for i in ("multixent", "optax")
            ]
            mib = n * c * ITEMSIZE[dtype] / 2**20
            lines.append(
                f"| {n} | {c} | {dtype} | {mib:.1f} | " + " | ".join(_fmt(v and v["ratio"], 3) for v in vals) + " |"
            )
        lines.append("")
    at = [t for t in res.times if (t["N"], t["C"], t["dtype"]) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE)]
    if at:
        lines += [
            "## Timings at the acceptance point",
            "",
            "Per call: minor page faults and CPU time of the whole process (page faults and system time are"
            " the cost of fresh memory, which this machine's kernel makes expensive and variable).",
            "",
            "| framework | pass | impl | median ms | q1–q3 ms | rounds | page faults | user ms | sys ms |",
            "|:---|:---|:---|---:|---:|---:|---:|---:|---:|",
        ]
        for t in at:
            lines.append(
                f"| {t['framework']} | {t['pass']} | {t['impl']} | {t['median_ms']:.1f} |"
                f" {t['q1_ms']:.0f}–{t['q3_ms']:.0f} | {t['rounds']} | {t['minflt_per_call']:.0f} |"
                f" {t['user_ms_per_call']:.0f} | {t['sys_ms_per_call']:.0f} |"
            )
        lines.append("")
    noisy = sorted(res.times, key=lambda t: -t["spread"])[:3]
    if noisy:
        lines += ["## Noise", "", "Largest interquartile spreads (IQR / median) among the timings:", ""]
        for t in noisy:
            lines.append(
                f"- {t['spread']:.0%}: {t['framework']} {t['pass']} {t['impl']} N={t['N']} C={t['C']} {t['dtype']}"
                f" (median {t['median_ms']:.3g} ms, load {t['load']})"
            )
        lines.append("")
    lines += ["![cross-entropy benchmark](cross_entropy.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dtypes = [d for d in ("float32", "bfloat16") if any(r["dtype"] == d for r in res.ratios)]
    if not dtypes:
        return
    colors = {"torch eager": "C0", "torch.compile": "C1", "jax.jit": "C2", "numpy": "C3"}
    fig, axes = plt.subplots(len(dtypes), 3, figsize=(16, 4.6 * len(dtypes)), squeeze=False)
    ns = sorted({r["N"] for r in res.ratios})
    styles = {n: s for n, s in zip(reversed(ns), ("-", "--", ":", "-."), strict=False)}
    for row, dtype in enumerate(dtypes):
        ax_f, ax_b, ax_m = axes[row]
        for ax, passes, title in ((ax_f, ("fwd",), "forward"), (ax_b, ("fwd+bwd", "and_grad/fwd"), "forward+backward")):
            for fw, col in colors.items():
                for n in ns:
                    for p in passes:
                        pts = sorted(
                            (r["C"], r["ratio"])
                            for r in res.ratios
                            if r["framework"] == fw and r["N"] == n and r["dtype"] == dtype and r["pass"] == p
                        )
                        if not pts:
                            continue
                        label = f"{fw} N={n}" if p != "and_grad/fwd" else f"numpy and_grad ÷ multixent fwd N={n}"
                        ax.plot(
                            *zip(*pts, strict=True),
                            styles[n],
                            color=col,
                            marker="o" if p != "and_grad/fwd" else "s",
                            label=label,
                        )
            ax.axhline(1.0, color="k", lw=0.8)
            if "and_grad/fwd" in passes and dtype == "float32":
                ax.axhline(LIMIT_AND_GRAD, color="C3", lw=0.8, ls=":")
            ax.set_title(f"{title} time, multixent / native ({dtype})", fontsize=10)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(
                matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else "")
            )
        ax_m.set_title(f"fwd+bwd extra memory ÷ logits bytes ({dtype})", fontsize=10)
        for fw, impl, native_name, col in (
            ("torch eager", "multixent", None, "C0"),
            ("torch eager", "native", "F.cross_entropy", "C0"),
            ("jax.jit", "multixent", None, "C2"),
            ("jax.jit", "optax", "optax", "C2"),
            ("numpy", "multixent and_grad", None, "C3"),
        ):
            recs = [
                m
                for m in res.memory
                if m["framework"] == fw
                and m["impl"] == impl
                and m["dtype"] == dtype
                and m["pass"] in ("fwd+bwd", "and_grad")
            ]
            best: dict[int, dict[str, Any]] = {}
            for m in recs:
                if m["C"] not in best or m["N"] > best[m["C"]]["N"]:
                    best[m["C"]] = m
            if not best:
                continue
            pts = sorted((cc, m["ratio"]) for cc, m in best.items())
            label = f"{fw} {native_name}" if native_name else (f"{fw} multixent" if fw != "numpy" else "numpy and_grad")
            ax_m.plot(
                *zip(*pts, strict=True),
                "--" if native_name else "-",
                color=col,
                marker="x" if native_name else "o",
                label=label,
            )
        ax_m.axhline(1.0, color="k", lw=0.8)
        for ax in axes[row]:
            ax.set_xscale("log")
            ax.set_xlabel("classes C")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        ax_f.set_ylabel("time ratio (log scale)")
        ax_m.set_ylabel("ratio (largest N measured at each C)")
        ax_m.set_ylim(bottom=0)
    fig.suptitle(
        f"multixent cross-entropy vs native — {res.meta['machine']['cpu_model']}, "
        f"{res.meta['machine']['usable_cores']} cores",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def _snapshot_imports(frameworks: list[str]) -> None:
    """Import multixent and the adapters needed now, so one run measures one version of the code.

    (The adapters are otherwise imported lazily, at the first array of their kind.)
    """
    import importlib

    import multixent  # noqa: F401

    for fw, module in (("torch", "multixent._adapters.torch"), ("jax", "multixent._adapters.jax")):
        if fw in frameworks:
            importlib.import_module(module)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"only the acceptance point (N={ACCEPT_N}, C={ACCEPT_C}, fp32)")
    p.add_argument("--only", action="append", choices=FRAMEWORKS, help="run only this framework (repeatable)")
    p.add_argument("--N", type=int, nargs="+", default=None, help=f"rows (default {DEFAULT_N})")
    p.add_argument("--C", type=int, nargs="+", default=None, help=f"classes (default {DEFAULT_C})")
    p.add_argument("--dtypes", nargs="+", choices=DEFAULT_DTYPES, default=None, help="default: float32 bfloat16")
    p.add_argument(
        "--max-elements",
        type=int,
        default=2**27,
        help="skip N*C above this (default 2**27, 512 MiB of fp32), except the acceptance point",
    )
    p.add_argument(
        "--compile",
        choices=("all", "fp32", "fp32-largest-n", "none"),
        default="fp32-largest-n",
        help="torch.compile for every config, for the fp32 ones, for the fp32 ones at the largest N (default),"
        " or none; the acceptance point is always compiled unless none (compiling costs ~5-20 s per graph here)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument(
        "--memory-repeats",
        type=int,
        default=MEMORY_REPEATS,
        help="fresh processes per RSS figure at the acceptance point (the least is reported)",
    )
    p.add_argument(
        "--mem-min-mib",
        type=float,
        default=4.0,
        help="measure RSS only when the logits are at least this big (default 4 MiB; RSS noise dominates below)",
    )
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (default 7)")
    p.add_argument("--max-rounds", type=int, default=15, help="more rounds while timings are noisy, up to this")
    p.add_argument("--max-spread", type=float, default=0.1, help="noisy: IQR / median above this (default 0.1)")
    p.add_argument("--extra-budget", type=float, default=20.0, help="seconds of extra rounds per comparison at most")
    p.add_argument(
        "--slow-call",
        type=float,
        default=5.0,
        help="a case whose warm-up call takes longer than this many s gets only --slow-rounds rounds (default 5)",
    )
    p.add_argument("--slow-rounds", type=int, default=3, help="rounds for such slow cases (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per case (default 2)")
    p.add_argument("--min-sample", type=float, default=0.05, help="repeat short calls until a sample lasts this many s")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default benchmarks/results)")
    p.add_argument(
        "--report-from",
        type=Path,
        default=None,
        help="run nothing: rewrite results.md and the plot in --out from this results.json",
    )
    p.add_argument("--check", action="store_true", help="exit with status 1 if an acceptance item fails")
    return p.parse_args(argv)


def _load(path: Path) -> Results:
    data = json.loads(path.read_text())
    res = Results(path, data["meta"])
    res.times, res.ratios, res.memory, res.compile = data["times"], data["ratios"], data["memory"], data["compile"]
    return res


def _report(res: Results, out: Path) -> list[dict[str, Any]]:
    acc = acceptance(res)
    res.meta["acceptance"] = acc
    write_markdown(res, out / "results.md", acc)
    write_plot(res, out / "cross_entropy.png")
    print()
    print(f"Acceptance of issue 3 at N={ACCEPT_N}, C={ACCEPT_C}, {ACCEPT_DTYPE}, forward+backward:")
    for a in acc:
        lim = "" if a["limit"] is None else f" (limit {a['limit']})"
        print(f"  [{a['item']:>4}] {a['verdict']:>12}  {a['what']}: {_fmt(a['value'])}{lim}  {a['detail']}")
    return acc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global MEMORY_REPEATS
    MEMORY_REPEATS = max(1, args.memory_repeats)
    if args.report_from is not None:
        res = _load(args.report_from)
        acc = _report(res, args.out)
        print(f"Rewrote {args.out / 'results.md'} and cross_entropy.png from {args.report_from}")
        return 1 if (args.check and any(a["verdict"] == "FAIL" for a in acc)) else 0
    t_start = time.time()
    if args.quick:
        ns, cs, dtypes = [ACCEPT_N], [ACCEPT_C], [ACCEPT_DTYPE]
    else:
        ns = args.N or list(DEFAULT_N)
        cs = args.C or list(DEFAULT_C)
        dtypes = args.dtypes or list(DEFAULT_DTYPES)
    args.ns = ns
    frameworks = args.only or list(FRAMEWORKS)
    configs = [
        (n, c, d)
        for d in dtypes
        for n in ns
        for c in cs
        if n * c <= args.max_elements or (n, c, d) == (ACCEPT_N, ACCEPT_C, ACCEPT_DTYPE)
    ]
    skipped = [(n, c) for n in ns for c in cs if n * c > args.max_elements and (n, c) != (ACCEPT_N, ACCEPT_C)]
    cmd_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    script = (
        os.path.relpath(Path(cmd_argv[0]).resolve(), Path.cwd()) if cmd_argv and cmd_argv[0] else "benchmarks/bench.py"
    )
    meta = {
        "command": " ".join(["python", script, *cmd_argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": M.machine_info(),
        "git": M.git_state(),
        "source_sha256": M.source_digest(SOURCE),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "frameworks": frameworks,
        "configs": configs,
        "skipped_over_max_elements": skipped,
        "acceptance_point": {"N": ACCEPT_N, "C": ACCEPT_C, "dtype": ACCEPT_DTYPE, "pass": "fwd+bwd"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _snapshot_imports(frameworks)
    res = Results(args.out / "results.json", meta)
    _log(f"multixent benchmark: {M.describe_machine(meta['machine'])}")
    _log(
        f"configs (N, C, dtype): {configs}; frameworks {frameworks}"
        + (f"; skipped (N, C) {skipped}" if skipped else "")
    )
    meta["errors"] = []
    for fw, runner in (("numpy", run_numpy), ("torch", run_torch), ("jax", run_jax)):
        if fw in frameworks:
            try:
                runner(res, args, configs)
            except Exception:
                err = traceback.format_exc()
                meta["errors"].append({"framework": fw, "traceback": err})
                _log(f"{fw} section FAILED, continuing:\n{err}")
    meta["wall_s"] = time.time() - t_start
    meta["load_average_end"] = M.load_average()
    meta["git_end"] = M.git_state()
    meta["source_sha256_end"] = M.source_digest(SOURCE)
    if meta["source_sha256_end"] != meta["source_sha256"]:
        _log("WARNING: multixent's source changed during the run; memory workers may have measured other code")
    acc = _report(res, args.out)
    res.save()
    print(f"Wrote {args.out / 'results.md'}, results.json, cross_entropy.png in {meta['wall_s'] / 60:.1f} min")
    failed = any(a["verdict"] == "FAIL" for a in acc)
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
