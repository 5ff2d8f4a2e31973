"""Benchmark of ``multixent.linear_cross_entropy`` (fused, chunked) against the naive ``h @ W.T`` path.

    python benchmarks/bench_linear.py                 # the sweep of issue 4 (V = 8192, 32768, 131072)
    python benchmarks/bench_linear.py --quick         # only the acceptance point V = 32768
    python benchmarks/bench_linear.py --V 8192 --rounds 3 --only torch

Forward+backward (the gradients with respect to ``hidden`` and ``classifier``), mean reduction,
class-index targets, fp32, N = 8192 rows, D = 512, no bias:

* torch eager: ``multixent.linear_cross_entropy(h, W, y)`` vs ``F.cross_entropy(h @ W.T, y)``;
* JAX under ``jax.jit`` (``jax.value_and_grad``): multixent vs
  ``optax.softmax_cross_entropy_with_integer_labels(h @ W.T, y).mean()``.

Times are medians of alternating rounds in this process (``_measure.time_interleaved``). Memory is
the peak RSS beyond the inputs in a fresh process for torch (``_measure.peak_extra_rss``: VmHWM
after ``clear_refs``, minus the RSS once the inputs exist; the gradients left in ``.grad`` count)
and ``memory_analysis()`` temp + output bytes for JAX; both are divided by the logits' bytes
``N·V·4``. The naive path is not *run* above ``--naive-max-v`` (default 32768): at V = 131072 its
logits alone take 4 GiB and torch holds about 3x that; JAX's naive memory there still comes from
``memory_analysis()`` of the compiled (not executed) function.

Writes ``results/linear.md``, ``results/linear.json`` and ``results/linear.png`` and prints the
acceptance items of issue 4 with PASS/FAIL.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _measure as M

HERE = Path(__file__).resolve().parent

N, D = 8192, 512
DEFAULT_V = (8192, 32768, 131072)
ACCEPT_V = 32768
BIG_V = 131072
FRAMEWORKS = ("torch", "jax")
IMPLS = ("fused", "naive")
#: Acceptance limits of issue 4 (at N=8192, D=512, V=32768, fp32, forward+backward).
LIMIT_MEMORY = 0.25
LIMIT_TIME = 1.2


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Inputs and the two paths (module level: the memory worker imports them)


def torch_inputs(n: int, d: int, v: int, seed: int = 0) -> tuple[Any, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * d**-0.5
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def torch_loss(impl: str) -> Callable[[Any, Any, Any], Any]:
    if impl == "fused":
        import multixent

        return multixent.linear_cross_entropy
    import torch.nn.functional as F

    return lambda h, w, y: F.cross_entropy(h @ w.T, y)


def torch_memory_case(impl: str, n: int, d: int, v: int, threads: int = 2) -> Callable[[], Any]:
    """Inputs created and touched; ``run()`` is one forward+backward, keeping the gradients."""
    import torch

    torch.set_num_threads(threads)
    f = torch_loss(impl)
    h, w, y = torch_inputs(n, d, v)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def run() -> Any:
        f(h, w, y).backward()
        return h.grad, w.grad

    return run


def jax_inputs(n: int, d: int, v: int, seed: int = 0) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    kh, kw, ky = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(kh, (n, d), jnp.float32)
    w = jax.random.normal(kw, (v, d), jnp.float32) * d**-0.5
    y = jax.random.randint(ky, (n,), 0, v, dtype=jnp.int32)
    return jax.block_until_ready((h, w, y))


def jax_loss(impl: str) -> Callable[[Any, Any, Any], Any]:
    if impl == "fused":
        import multixent

        return lambda h, w, y: multixent.linear_cross_entropy(h, w, y)
    import optax

    return lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean()


# ------------------------------------------------------------------------------------------------
# Measurements


def _time(args: argparse.Namespace, cases: dict[str, Callable[[], Any]]) -> dict[str, M.Timing]:
    rounds = args.rounds if len(cases) > 1 else args.solo_rounds
    return M.time_interleaved(cases, rounds=rounds, warmup=1, min_sample_s=0.0, max_rounds=rounds)


def _record(res: dict[str, Any], **rec: Any) -> None:
    res["records"].append(rec)
    _save(res)


def _save(res: dict[str, Any]) -> None:
    path = res["path"]
    data = {k: v for k, v in res.items() if k != "path"}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _naive_runs(args: argparse.Namespace, v: int) -> bool:
    return v <= args.naive_max_v


def _torch_case(f: Callable[..., Any], h: Any, w: Any, y: Any) -> Callable[[], None]:
    """One forward+backward; the gradients are reset first (not accumulated)."""

    def run() -> None:
        h.grad = w.grad = None
        f(h, w, y).backward()

    return run


def _jax_case(f: Callable[..., Any], h: Any, w: Any, y: Any) -> Callable[[], Any]:
    import jax

    return lambda: jax.block_until_ready(f(h, w, y))


def run_torch(res: dict[str, Any], args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    for v in args.V:
        logits = N * v * 4
        impls = [i for i in IMPLS if i == "fused" or _naive_runs(args, v)]
        _log(f"torch eager V={v} (logits {logits / 2**20:.0f} MiB): {', '.join(impls)}")
        h, w, y = torch_inputs(N, D, v)
        h.requires_grad_(True)
        w.requires_grad_(True)

        timings = _time(args, {i: _torch_case(torch_loss(i), h, w, y) for i in impls})
        del h, w, y
        gc.collect()
        for impl in IMPLS:
            rec: dict[str, Any] = {"framework": "torch eager", "impl": impl, "N": N, "D": D, "V": v}
            rec["logits_bytes"] = logits
            if impl not in timings:
                rec["skipped"] = (
                    f"naive path not run above V={args.naive_max_v} (logits alone {logits / 2**30:.0f} GiB)"
                )
                _log(f"  {impl:5s} skipped: {rec['skipped']}")
                _record(res, **rec)
                continue
            rec["time"] = timings[impl].as_dict()
            if not args.no_memory:
                warm = {"impl": impl, "n": 64, "d": D, "v": min(v, 8192), "threads": args.threads}
                mem = M.peak_extra_rss(
                    "bench_linear:torch_memory_case",
                    {"impl": impl, "n": N, "d": D, "v": v, "threads": args.threads},
                    warmup_kwargs=warm,
                )
                rec["memory"] = mem
                rec["memory_bytes"] = mem["extra_bytes"]
                rec["memory_ratio"] = mem["extra_bytes"] / logits
            _log(
                f"  {impl:5s} {timings[impl].median:7.2f} s"
                + (
                    f"   peak extra {rec['memory_bytes'] / 2**20:7.0f} MiB = {rec['memory_ratio']:.3f} x logits"
                    if "memory_bytes" in rec
                    else ""
                )
            )
            _record(res, **rec)
        if len(timings) == 2:
            _log(f"  time fused / naive = {M.ratio(timings['fused'], timings['naive']):.3f}")


def run_jax(res: dict[str, Any], args: argparse.Namespace) -> None:
    import jax

    for v in args.V:
        logits = N * v * 4
        impls = [i for i in IMPLS if i == "fused" or _naive_runs(args, v)]
        _log(f"jax.jit V={v} (logits {logits / 2**20:.0f} MiB): {', '.join(impls)} timed")
        h, w, y = jax_inputs(N, D, v)
        cases: dict[str, Callable[[], Any]] = {}
        stats: dict[str, dict[str, int]] = {}
        compile_s: dict[str, float] = {}
        for impl in IMPLS:
            g = jax.value_and_grad(jax_loss(impl), argnums=(0, 1))
            t0 = time.perf_counter()
            stats[impl] = M.xla_memory(g, h, w, y)
            compile_s[impl] = time.perf_counter() - t0
            if impl in impls:
                cases[impl] = _jax_case(jax.jit(g), h, w, y)
        timings = _time(args, cases)
        for impl in IMPLS:
            extra = stats[impl]["temp_size_in_bytes"] + stats[impl]["output_size_in_bytes"]
            rec: dict[str, Any] = {"framework": "jax.jit", "impl": impl, "N": N, "D": D, "V": v}
            rec |= {"logits_bytes": logits, "memory": stats[impl], "memory_bytes": extra}
            rec |= {"memory_ratio": extra / logits, "compile_s": compile_s[impl]}
            if impl in timings:
                rec["time"] = timings[impl].as_dict()
            else:
                rec["skipped"] = (
                    f"naive path not run above V={args.naive_max_v} (logits alone {logits / 2**30:.0f} GiB);"
                    " memory from memory_analysis() of the compiled function"
                )
            _log(
                f"  {impl:5s} "
                + (f"{timings[impl].median:7.2f} s" if impl in timings else "    (not run)")
                + f"   temp+output {extra / 2**20:7.0f} MiB = {extra / logits:.3f} x logits"
            )
            _record(res, **rec)
        if len(timings) == 2:
            _log(f"  time fused / naive = {M.ratio(timings['fused'], timings['naive']):.3f}")
        del cases, h, w, y
        jax.clear_caches()
        gc.collect()


def run_tests() -> dict[str, Any]:
    """Acceptance item 3: tests/test_linear.py (torch, JAX and NumPy cases), if pytest is installed."""
    if importlib.util.find_spec("pytest") is None or importlib.util.find_spec("hypothesis") is None:
        return {"status": "SKIP", "detail": "pytest/hypothesis not installed here; run `nox -s tests`"}
    env = {**os.environ}
    env.pop("MULTIXENT_BACKENDS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE.parent / "tests" / "test_linear.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(HERE.parent),
    )
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [proc.stderr[-300:]]
    return {
        "status": "PASS" if proc.returncode == 0 else "FAIL",
        "detail": f"pytest tests/test_linear.py: {tail[0]} ({time.perf_counter() - t0:.0f} s)",
    }


# ------------------------------------------------------------------------------------------------
# Acceptance, Markdown, plot


def _rec(res: dict[str, Any], framework: str, impl: str, v: int) -> dict[str, Any] | None:
    for r in res["records"]:
        if r["framework"] == framework and r["impl"] == impl and r["V"] == v:
            return r
    return None


def _time_ratio(res: dict[str, Any], framework: str, v: int) -> float | None:
    a, b = _rec(res, framework, "fused", v), _rec(res, framework, "naive", v)
    if not a or not b or "time" not in a or "time" not in b:
        return None
    return float(a["time"]["median_ms"] / b["time"]["median_ms"])


def _paired_ratio(res: dict[str, Any], framework: str, v: int) -> float | None:
    a, b = _rec(res, framework, "fused", v), _rec(res, framework, "naive", v)
    if not a or not b or "time" not in a or "time" not in b:
        return None
    return M.paired_ratio(M.Timing(a["time"]["samples_ms"]), M.Timing(b["time"]["samples_ms"]))


def acceptance(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []

    def item(num: str, what: str, value: float | None, limit: float | None, detail: str = "") -> None:
        if value is None:
            status = "MISSING"
        elif limit is None:
            status = "PASS" if value else "FAIL"
        else:
            status = "PASS" if value <= limit else "FAIL"
        items.append({"item": num, "what": what, "value": value, "limit": limit, "status": status, "detail": detail})

    for num, fw, label in (("1", "torch eager", "torch"), ("2", "jax.jit", "JAX jit")):
        fused = _rec(res, fw, "fused", ACCEPT_V)
        naive = _rec(res, fw, "naive", ACCEPT_V)
        mem = fused.get("memory_ratio") if fused else None
        nmem = naive.get("memory_ratio") if naive else None
        item(
            num,
            f"{label}: peak extra memory / logits bytes, fused",
            mem,
            LIMIT_MEMORY,
            "" if nmem is None else f"naive {nmem:.2f}x",
        )
        paired = _paired_ratio(res, fw, ACCEPT_V)
        item(
            num,
            f"{label}: time fused / naive (medians)",
            _time_ratio(res, fw, ACCEPT_V),
            LIMIT_TIME,
            "" if paired is None else f"paired {paired:.3f}",
        )
    tests = res.get("tests")
    if tests is not None:
        items.append(
            {
                "item": "3",
                "what": "values and gradients equal the naive path (tests/test_linear.py)",
                "value": None,
                "limit": None,
                "status": tests["status"],
                "detail": tests["detail"],
            }
        )
    for fw, label in (("torch eager", "torch"), ("jax.jit", "JAX jit")):
        r = _rec(res, fw, "fused", BIG_V)
        done = None if r is None else float("time" in r)
        detail = ""
        if r and "time" in r:
            detail = f"{r['time']['median_ms'] / 1e3:.1f} s, {r.get('memory_bytes', 0) / 2**20:.0f} MiB extra"
        item("4", f"{label}: V={BIG_V} fused run completes", done, None, detail)
    return items


def _fmt_mem(r: dict[str, Any] | None) -> str:
    if not r or "memory_bytes" not in r:
        return "—"
    note = " (not run)" if "skipped" in r else ""
    return f"{r['memory_bytes'] / 2**20:,.0f} MiB ({r['memory_ratio']:.2f}×){note}"


def _fmt_time(r: dict[str, Any] | None) -> str:
    if not r or "time" not in r:
        return "not run"
    t = r["time"]
    return f"{t['median_ms'] / 1e3:.2f} s"


def write_markdown(res: dict[str, Any], path: Path, acc: list[dict[str, Any]]) -> None:
    meta = res["meta"]
    lines = [
        "# Fused linear cross-entropy vs the naive `h @ W.T` path",
        "",
        f"Machine: {M.describe_machine(meta['machine'])}.",
        f"Command: `{meta['command']}` ({meta['started']}, commit {meta['git']['describe']}).",
        "",
        f"Forward+backward (gradients of `hidden` and `classifier`), mean reduction, fp32, N={N}, D={D}, no bias.",
        "torch eager: `multixent.linear_cross_entropy(h, W, y)` vs `F.cross_entropy(h @ W.T, y)`, "
        f"{meta['args']['threads']} threads, memory = peak RSS beyond the inputs in a fresh process "
        "(the gradients included). JAX under `jit`: vs `optax.softmax_cross_entropy_with_integer_labels"
        "(h @ W.T, y).mean()`, memory = `memory_analysis()` temp + output bytes. Times are medians of "
        "alternating rounds; the ratio × is memory over the logits' bytes (N·V·4).",
        "",
        "| framework | V | logits | fused time | naive time | fused / naive time | fused memory | naive memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fw in ("torch eager", "jax.jit"):
        for v in sorted({r["V"] for r in res["records"] if r["framework"] == fw}):
            fused, naive = _rec(res, fw, "fused", v), _rec(res, fw, "naive", v)
            ratio = _time_ratio(res, fw, v)
            lines.append(
                f"| {fw} | {v} | {N * v * 4 / 2**20:,.0f} MiB | {_fmt_time(fused)} | {_fmt_time(naive)} | "
                f"{'—' if ratio is None else f'{ratio:.2f}'} | {_fmt_mem(fused)} | {_fmt_mem(naive)} |"
            )
    skipped = sorted({r["V"] for r in res["records"] if r["impl"] == "naive" and "skipped" in r})
    if skipped:
        lines += [
            "",
            f"The naive path was not run at V = {', '.join(map(str, skipped))}: its logits alone take "
            f"{N * skipped[0] * 4 / 2**30:.0f} GiB (torch holds ~3× that at its peak). JAX's naive memory there "
            "is `memory_analysis()` of the compiled, unexecuted function.",
        ]
    lines += [
        "",
        "## Acceptance (issue 4)",
        "",
        "| item | what | value | limit | status | detail |",
        "|---|---|---:|---:|---|---|",
    ]
    for a in acc:
        value = "" if a["value"] is None or a["limit"] is None else f"{a['value']:.3f}"
        limit = "" if a["limit"] is None else f"≤ {a['limit']}"
        lines.append(f"| {a['item']} | {a['what']} | {value} | {limit} | {a['status']} | {a['detail']} |")
    lines += ["", "![time and memory of the fused path against the naive one](linear.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"torch eager": "C0", "jax.jit": "C2"}
    for fw, col in colors.items():
        for impl, style, marker in (("fused", "-", "o"), ("naive", "--", "x")):
            recs = [r for r in res["records"] if r["framework"] == fw and r["impl"] == impl]
            t_pts = sorted((r["V"], r["time"]["median_ms"] / 1e3) for r in recs if "time" in r)
            m_pts = sorted((r["V"], r["memory_bytes"] / 2**20) for r in recs if "memory_bytes" in r)
            label = f"{fw} {'multixent fused' if impl == 'fused' else 'naive h @ W.T'}"
            if t_pts:
                ax_t.plot(*zip(*t_pts, strict=True), style, color=col, marker=marker, label=label)
            if m_pts:
                ax_m.plot(*zip(*m_pts, strict=True), style, color=col, marker=marker, label=label)
    vs = sorted({r["V"] for r in res["records"]})
    if vs:
        ax_m.plot(vs, [N * v * 4 / 2**20 for v in vs], ":", color="k", label="logits bytes (N·V·4)")
        ax_m.plot(vs, [LIMIT_MEMORY * N * v * 4 / 2**20 for v in vs], ":", color="C3", label="0.25 × logits")
    ax_t.set_title(f"forward+backward time (N={N}, D={D}, fp32)")
    ax_t.set_ylabel("seconds")
    ax_m.set_title("peak extra memory (torch: RSS; JAX: temp+output)")
    ax_m.set_ylabel("MiB")
    ax_m.set_yscale("log")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary V")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"multixent.linear_cross_entropy vs naive — {res['meta']['machine']['cpu_model']}, "
        f"{res['meta']['machine']['usable_cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"only V={ACCEPT_V} (the acceptance point)")
    p.add_argument("--only", action="append", choices=FRAMEWORKS, help="run only this framework (repeatable)")
    p.add_argument("--V", type=int, nargs="+", default=None, help=f"vocabulary sizes (default {DEFAULT_V})")
    p.add_argument("--naive-max-v", type=int, default=ACCEPT_V, help="run the naive path only up to this V")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds, fused vs naive (default 5)")
    p.add_argument("--solo-rounds", type=int, default=2, help="timing rounds when only the fused path runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip torch's fresh-process memory measurements")
    p.add_argument("--no-tests", action="store_true", help="do not run tests/test_linear.py for item 3")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory (default benchmarks/results)")
    p.add_argument("--check", action="store_true", help="exit with status 1 if an acceptance item fails")
    args = p.parse_args(argv)
    args.V = [ACCEPT_V] if args.quick else (args.V or list(DEFAULT_V))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frameworks = args.only or list(FRAMEWORKS)
    cmd_argv = sys.argv if argv is None else [sys.argv[0], *argv]
    meta = {
        "command": " ".join(["python", "benchmarks/bench_linear.py", *cmd_argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": M.machine_info(),
        "git": M.git_state(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "frameworks": frameworks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"path": args.out / "linear.json", "meta": meta, "records": []}
    _log(f"linear cross-entropy benchmark: {M.describe_machine(meta['machine'])}")
    _log(f"N={N} D={D} V={args.V}; frameworks {frameworks}; naive path run up to V={args.naive_max_v}")
    t0 = time.time()
    if "torch" in frameworks:
        run_torch(res, args)
    if "jax" in frameworks:
        run_jax(res, args)
    if not args.no_tests:
        _log("acceptance item 3: running tests/test_linear.py")
        res["tests"] = run_tests()
    meta["seconds"] = round(time.time() - t0, 1)
    meta["load_average_end"] = M.load_average()
    acc = acceptance(res, args)
    res["acceptance"] = acc
    _save(res)
    write_markdown(res, args.out / "linear.md", acc)
    try:
        write_plot(res, args.out / "linear.png")
    except ImportError as err:  # matplotlib missing
        _log(f"no plot: {err}")
    _log(f"wrote {args.out / 'linear.md'}, linear.json, linear.png ({meta['seconds']:.0f} s)")
    print("\nAcceptance (issue 4, N=8192, D=512, V=32768, fp32, forward+backward):")
    for a in acc:
        value = "" if a["value"] is None or a["limit"] is None else f" {a['value']:.3f} (limit {a['limit']})"
        print(f"  [{a['status']}] {a['item']}. {a['what']}:{value} {a['detail']}".rstrip())
    failed = [a for a in acc if a["status"] in ("FAIL", "MISSING")]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
