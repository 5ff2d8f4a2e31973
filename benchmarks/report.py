"""Turn asv's results JSON into ``results.md`` and two plots (no measurement here).

    python benchmarks/report.py                           # the newest result in benchmarks/.asv/results
    python benchmarks/report.py --results FILE_OR_DIR --out DIR

Ratios are multixent / native in the same ``asv run``; times asv's medians; torch and NumPy memory
``peakmem_<pass> - peakmem_baseline`` ÷ the logits' bytes (JAX's ``track_*`` is in that unit already). The checks
and limits come from ``limits.json``. Writes ``results.md``, the plots and ``asv_results.json`` (the raw file).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases._common import ACCEPT, ITEMSIZE, LINEAR_N, SHAPES, TINY, shape  # noqa: E402

Key = tuple[Any, ...]
#: One comparison: (pass, benchmark, multixent's ``impl``, the native ``impl`` or None).
Pair = tuple[str, str, str, str | None]
#: Values of a benchmark's last parameter that name the implementation (the others name the point).
IMPLS = {"multixent", "native", "optax", "scipy", "multixent_and_grad", "numpy_grad", "fused", "naive"}
IMPLS |= {"loss_parallel", "floor", "kernel"}
F32, CE, DIST, LOGITS, LOCAL = "float32", "cross_entropy.", "distributed.", "memory ÷ logits", "memory ÷ local logits"
#: Upper edges (seconds) of the bands of the native loss's time, for the worst ratio in each.
BANDS, BAND_NAMES = (0.2e-3, 2e-3), ("< 0.2 ms", "0.2-2 ms", "≥ 2 ms")

#: Each framework's passes: (pass, multixent's impl, the native impl, time benchmark, memory benchmark or None).
FRAMEWORKS: dict[str, list[tuple[str, str, str, str, str | None]]] = {
    "torch eager": [("fwd", "multixent", "native", "TorchEager.time_fwd", "TorchEagerMemory.extra_fwd"),
                    ("fwd+bwd", "multixent", "native", "TorchEager.time_fwd_bwd", "TorchEagerMemory.extra_fwd_bwd")],
    "torch.compile": [("fwd", "multixent", "native", "TorchCompileFwd.time_call", None),
                      ("fwd+bwd", "multixent", "native", "TorchCompileFwdBwd.time_call", None)],
    "jax.jit": [("fwd", "multixent", "optax", "JaxJitFwd.time_call", "JaxJitMemory.track_fwd"),
                ("value_and_grad", "multixent", "optax", "JaxJitValueAndGrad.time_call", "JaxJitMemory.track_fwd_bwd")],
    "numpy": [("fwd", "multixent", "scipy", "NumPy.time_call", "NumPyMemory.extra_call"),
              ("and_grad", "multixent_and_grad", "numpy_grad", "NumPy.time_call", "NumPyMemory.extra_call")],
}  # fmt: skip
TIME = {fw: [(w, CE + t, m, n) for w, m, n, t, _ in passes] for fw, passes in FRAMEWORKS.items()}
MEMORY = {fw: [(w, CE + mem, m, n) for w, m, n, _, mem in passes if mem] for fw, passes in FRAMEWORKS.items()}
MEMORY[f"per option, {ACCEPT} float32 fwd+bwd (softcap=30, label_smoothing=0.1, class weights, z_loss=1e-4)"] = [
    ("torch eager", "options.TorchOptionsMemory.extra_fwd_bwd", "multixent", "native"),
    ("jax.jit", "options.JaxOptionsMemory.track_fwd_bwd", "multixent", "optax"),
]
LINEAR: dict[str, list[Pair]] = {
    "torch eager": [("time", "linear.TorchLinear.time_fwd_bwd", "fused", "naive"),
                    (LOGITS, "linear.TorchLinearMemory.extra_fwd_bwd", "fused", "naive")],
    "jax.jit": [("time", "linear.JaxLinear.time_fwd_bwd", "fused", "naive"),
                (LOGITS, "linear.JaxLinearMemory.track_fwd_bwd", "fused", "naive")],
}  # fmt: skip
DISTRIBUTED: dict[str, list[Pair]] = {
    "cross_entropy, DTensor `Shard(1)` logits": [
        ("time per rank", DIST + "TorchVocabParallel.track_time_per_rank", "multixent", "loss_parallel"),
        (LOCAL, DIST + "TorchVocabParallel.track_peak_extra_memory", "multixent", "loss_parallel")],
    "linear_cross_entropy, classifier split by vocabulary rows": [
        (LOCAL, DIST + "TorchLinearVocabParallel.track_peak_extra_memory", "multixent", None)],
}  # fmt: skip


def is_shape(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"\d+x\d+", v) is not None


def dtype_of(p: Key) -> str:
    return p[1] if len(p) > 1 and p[1] in ITEMSIZE else F32


def is_time(bench: str) -> bool:
    return "time" in bench.rsplit(".", 1)[1]


def logits_bytes(key: Key) -> int:
    """The logits' bytes at a memory benchmark's parameters: (NxC[, dtype], impl), (V, impl) or (option, impl)."""
    n, c = (LINEAR_N, key[0]) if isinstance(key[0], int) else shape(key[0] if is_shape(key[0]) else ACCEPT)
    return n * c * ITEMSIZE.get(key[1] if len(key) > 2 else F32, 4)


class Results:
    """asv's results as ``values[benchmark][parameters]``, without skipped or failed points; ``<cls>.extra_<pass>``."""

    def __init__(self, path: Path) -> None:
        self.path, self.meta = path, json.loads(path.read_text())
        self.values: dict[str, dict[Key, float]] = {}
        self.failed, self.started = [], []  # failed benchmarks; each one's start (ms since the epoch)
        for name, row in self.meta["results"].items():
            rec = dict(zip(self.meta["result_columns"], row, strict=False))
            self.started += [rec["started_at"]] if rec.get("started_at") else []
            if rec.get("result") is None:
                self.failed.append(name)
                continue
            grid = itertools.product(*[[ast.literal_eval(p) for p in ps] for ps in rec["params"]])
            self.values[name] = {k: v for k, v in zip(grid, rec["result"], strict=False) if v is not None and v == v}
        for name in [n for n in self.values if ".peakmem_" in n and not n.endswith(".peakmem_baseline")]:
            cls, method = name.split(".peakmem_")
            base = self.values.get(f"{cls}.peakmem_baseline", {})
            extra = {k: (v - base[k]) / logits_bytes(k) for k, v in self.values[name].items() if k in base}
            self.values[f"{cls}.extra_{method}"] = extra

    def get(self, name: str, point: Key, impl: str | None) -> float | None:
        return self.values.get(name, {}).get(point if impl is None else (*point, impl))

    def points(self, names: list[str]) -> list[Key]:
        """The points (the parameters but ``impl``) of ``names``: float32 first, then by size."""
        pts = {k[:-1] if k and k[-1] in IMPLS else k for n in names for k in self.values.get(n, {})}
        return sorted(pts, key=lambda p: ("bfloat16" in p, [shape(v) if is_shape(v) else v for v in p]))


def fmt(v: float | None, time: bool = False) -> str:
    if v is None:
        return "—"
    units = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 0.0))
    return next(f"{v / (k or 1e-9):.3g} {u}" for u, k in units if abs(v) >= k) if time else f"{v:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "| :--- |" + " ---: |" * (len(head) - 1)]
    return [*lines, *("| " + " | ".join(r) + " |" for r in rows), ""]


def point(p: Key) -> str:
    return ", ".join(map(str, p)) or "—"


def pair_table(res: Results, title: str, pairs: list[Pair]) -> list[str]:
    """One row a point: each pair's multixent and native figure, and their ratio where it is a time."""
    pts = res.points([b for _, b, _, _ in pairs])
    if not pts:
        return []
    head, rows = ["point"], [[point(p)] for p in pts]
    for what, bench, mine, native in pairs:
        t = is_time(bench)
        head += [f"{what}: {mine}", *([native] if native else []), *(["ratio"] if t else [])]
        for p, row in zip(pts, rows, strict=True):
            a, b = res.get(bench, p, mine), res.get(bench, p, native)
            row += [fmt(a, t), *([fmt(b, t)] if native else []), *([fmt(ratio(a, b))] if t else [])]
    return [f"### {title}", "", *table(head, rows)]


def section(title: str, res: Results, specs: dict[str, list[Pair]]) -> list[str]:
    body = [line for t, pairs in specs.items() for line in pair_table(res, t, pairs)]
    return [f"## {title}", "", *body] if body else []


def section_acceptance(res: Results, checks: list[dict[str, Any]]) -> list[str]:
    rows = []
    for c in checks:
        bench, lim = c["benchmark"], c["limit"]
        a, b = (next((v for p in ((ACCEPT, F32), (ACCEPT,)) if (v := res.get(bench, p, i)) is not None), None)
                for i in c["impls"])  # fmt: skip
        v = ratio(a, b) if is_time(bench) else a
        result = "not measured" if v is None else "—" if lim is None else "pass" if v <= lim else "**fail**"
        detail = f"{fmt(a, True)} vs {fmt(b, True)}" if is_time(bench) else f"{c['impls'][1]}: {fmt(b)}"
        rows.append([c["what"], fmt(v), "—" if lim is None else f"≤ {lim:g}", result, detail])
    if all(r[3] == "not measured" for r in rows):
        return []
    head = ["measured", "value", "limit", "result", "detail"]
    return [f"## Acceptance point ({ACCEPT}, float32, forward+backward)", "", *table(head, rows)]


def time_points(res: Results) -> Iterator[tuple[str, int, Pair, Key, float, float]]:
    """(framework, index of the pass, its pair, point, multixent's time, the native's) of each measured time pair."""
    for fw, pairs in TIME.items():
        for i, (what, bench, mine, native) in enumerate(pairs):
            for p in res.points([bench]):
                a, b = res.get(bench, p, mine), res.get(bench, p, native)
                if a is not None and b is not None:
                    yield fw, i, (what, bench, mine, native), p, a, b


def section_bands(res: Results, bars: dict[str, list[float]]) -> list[str]:
    """The worst ratio in each band of the native loss's time, float32 / bfloat16; bold: above the bar."""
    worst: dict[str, dict[tuple[int, str], tuple[float, str]]] = {}
    for fw, _, pair, p, a, b in time_points(res):
        w, key = worst.setdefault(f"{fw} {pair[0]}", {}), (sum(b >= edge for edge in BANDS), dtype_of(p))
        w[key] = max(w.get(key, (0.0, "")), (a / b, p[0]))
    rows = []
    for case, w in worst.items():
        lim = bars.get(case)
        cells = [[("**{:.2f}**" if lim and r > lim[band] else "{:.2f}").format(r) + f" ({s}, {d})"
                  for (bd, d), (r, s) in w.items() if bd == band] for band in range(len(BANDS) + 1)]  # fmt: skip
        rows.append([case, *(" / ".join(c) or "—" for c in cells), " / ".join(f"{x:g}" for x in lim or []) or "—"])
    text = "The worst ratio (multixent / native) in each band of the native loss's time, with its point."
    return ["## By the native loss's time", "", text, "", *table(["case", *BAND_NAMES, "bars"], rows)] if rows else []


def section_in_process(res: Results) -> list[str]:
    """The ``*Ratio`` benchmarks: ``impl`` / native timed in one process, alternating rounds."""
    out = []
    for cls in sorted({n.rsplit(".", 1)[0] for n in res.values if "Ratio.track_" in n}):
        names = sorted(n for n in res.values if n.startswith(cls + ".track_"))
        impls = list(dict.fromkeys(k[-1] if k[-1] in IMPLS else None for n in names for k in res.values[n]))
        cols = [(n, i) for n in names for i in impls]
        head = ["point"] + [n.split(".track_")[1] + (f": {i}" if i else "") for n, i in cols]
        out += [f"### {cls.split('.')[-1]}: ratio to the native loss", ""]
        out += table(head, [[point(p), *(fmt(res.get(n, p, i)) for n, i in cols)] for p in res.points(names)])
    text = ("Each the best of 7 alternating rounds of ~50 ms in one process. *floor*: the formula in the fewest"
            " operations, no Python around them; *kernel*: torch's `log_softmax` as the primitive.")  # fmt: skip
    return ["## Both losses in one process", "", text, "", *out] if out else []


def plot(path: Path, title: str, panels: dict[str, dict[str, list[tuple[float, float]]]]) -> list[str]:
    """One log-log panel per entry, one line per series; the markdown that shows it (none if nothing to plot)."""
    panels = {t: series for t, s in panels.items() if (series := {k: sorted(v) for k, v in s.items() if v})}
    if not panels:
        return []
    from matplotlib.figure import Figure  # no pyplot: no backend, no global state

    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="tight")
    for ax, (name, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items(), strict=True):
        for label, xy in series.items():
            ax.loglog(*zip(*xy, strict=True), "o-", label=label)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    return [f"![{title}]({path.name})", ""]


def plots(res: Results, out: Path) -> list[str]:
    """Time ratio against the logits' size (cross-entropy); fused and naive against V (linear_cross_entropy)."""
    ce: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for fw, i, _, p, a, b in time_points(res):
        n, c = shape(p[0])
        ce.setdefault(f"{('fwd', 'fwd+bwd')[i]}, {dtype_of(p)}", {}).setdefault(fw, []).append((n * c, a / b))
    linear = {
        f"{fw} {what}": {i: [(p[0], v) for p in res.points([b]) if (v := res.get(b, p, i)) is not None] for i in (m, n)}
        for fw, pairs in LINEAR.items() for what, b, m, n in pairs if n
    }  # fmt: skip
    ce_plot = plot(out / "cross_entropy.png", "cross_entropy time, multixent / native, against the logits' N·C", ce)
    return ce_plot + plot(out / "linear.png", "linear_cross_entropy", linear)


def header(res: Results) -> list[str]:
    m, day = res.meta["params"], "%Y-%m-%d %H:%M UTC"
    first, last = (time.strftime(day, time.gmtime(f(res.started, default=0) / 1000)) for f in (min, max))
    return [
        "# multixent benchmark",
        "",
        "By asv (`benchmarks/asv.conf.json`) and `benchmarks/report.py`: every ratio multixent / native in the same"
        " run (below 1: multixent faster); memory the peak beyond the inputs ÷ the logits' bytes; torch 2 threads.",
        "",
        *(["**Tiny grid (`MULTIXENT_BENCH_GRID=tiny`): a check of the pipeline, not a measurement.**", ""] * TINY),
        f"- Machine: {m.get('cpu')}, {m.get('num_cpu')} cores, {int(m.get('ram', 0)) / 2**30:.0f} GiB, {m.get('os')}",
        f"- Code: multixent at `{res.meta['commit_hash'][:8]}`; benchmarks started {first} to {last}",
        f"- Raw results: asv's `{res.meta['commit_hash'][:8]}-{res.meta.get('env_name')}.json`",
        *([f"- **Failed** (no result; see asv's output): {', '.join(res.failed)}"] if res.failed else []),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / ".asv" / "results", help="asv results file or directory")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    args = p.parse_args(argv)
    found = [f for f in args.results.rglob("*.json") if f.name not in ("machine.json", "benchmarks.json")]
    path = args.results if args.results.is_file() else max(found, key=lambda f: f.stat().st_mtime, default=None)
    if path is None:
        sys.exit(f"no asv results under {args.results}: run `asv run` first (see benchmarks/asv.conf.json)")
    res, limits = Results(path), json.loads((HERE / "limits.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    acceptance = section_acceptance(res, limits["acceptance"])
    lines = [*header(res), *acceptance, *section_bands(res, limits["bands"]), *section_in_process(res)]
    lines += section(f"Time (asv's medians; {SHAPES[0]}: the fixed per-call cost)", res, TIME)
    memory = "torch, numpy: peak RSS, fwd+bwd with the 1x `.grad`; jax.jit: `memory_analysis()` temp + output"
    lines += section(f"Extra memory ÷ logits bytes ({memory})", res, MEMORY)
    lines += section(f"linear_cross_entropy: fused vs naive `h @ W.T` (N={LINEAR_N}, fp32, fwd+bwd)", res, LINEAR)
    lines += section("Distributed: vocabulary parallelism on 2 gloo processes", res, DISTRIBUTED)
    try:
        lines += plots(res, args.out)
    except ImportError as err:
        print(f"no plots: {err}")
    (args.out / "results.md").write_text("\n".join(lines))
    if path.resolve() != (args.out / "asv_results.json").resolve():
        shutil.copyfile(path, args.out / "asv_results.json")
    print(*acceptance, f"wrote {args.out / 'results.md'} from {path}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
