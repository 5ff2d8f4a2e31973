"""Turn asv's results JSON into ``results/results.md`` and the plots (no measurement here).

    python benchmarks/report.py                           # newest result in benchmarks/.asv/results
    python benchmarks/report.py --results FILE_OR_DIR --out DIR

Every ratio is multixent / native from the same ``asv run`` (both are parameters, ``impl``, of the
same benchmark). Times are asv's medians. Peak RSS is asv's ``peakmem_*`` (one fresh process per
figure) and the extra memory is ``peakmem_<pass> - peakmem_baseline`` at the same parameters, divided by the
logits' bytes; JAX's memory is a ``track_*`` of ``memory_analysis()`` already in that unit.

Writes ``results.md``, ``cross_entropy.png``, ``linear.png`` and ``asv_results.json`` (the raw
asv file the figures come from) into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases._common import ACCEPT, ITEMSIZE, LINEAR_ACCEPT_V, LINEAR_D, LINEAR_N, SHAPES, TINY, shape  # noqa: E402

Params = tuple[Any, ...]


class Results:
    """asv's results file as ``{benchmark name: {params tuple: {"value", "q25", "q75", "samples"}}}``."""

    def __init__(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self.path = path
        self.meta = {k: v for k, v in data.items() if k != "results"}
        cols = data["result_columns"]
        self.bench: dict[str, dict[Params, dict[str, Any]]] = {}
        self.started: list[int] = []
        self.failed: list[str] = []
        for name, row in data["results"].items():
            rec = dict(zip(cols, row, strict=False))
            if rec.get("started_at"):
                self.started.append(rec["started_at"])
            values = rec.get("result")
            if values is None:
                self.failed.append(name)
                continue
            grid = list(itertools.product(*[[ast.literal_eval(p) for p in ps] for ps in rec["params"]]))
            out = {}
            for i, combo in enumerate(grid):
                if values[i] is None or values[i] != values[i]:  # failed, or skipped (asv's NaN)
                    continue
                out[combo] = {
                    "value": values[i],
                    "q25": _at(rec.get("stats_q_25"), i),
                    "q75": _at(rec.get("stats_q_75"), i),
                    "samples": _at(rec.get("samples"), i),
                }
            self.bench[name] = out

    def get(self, name: str, *params: Any) -> float | None:
        r = self.bench.get(name, {}).get(tuple(params))
        return None if r is None else float(r["value"])

    def peak(self, name: str, *params: Any) -> float | None:
        """asv's ``peakmem_*`` in bytes (one fresh process: asv keeps one value per peakmem)."""
        return self.get(name, *params)

    def extra(self, cls: str, method: str, *params: Any) -> float | None:
        """``peakmem_<method> - peakmem_baseline`` in bytes (both asv's peak RSS, same parameters)."""
        a, b = self.peak(f"{cls}.peakmem_{method}", *params), self.peak(f"{cls}.peakmem_baseline", *params)
        return None if a is None or b is None else a - b


def _at(xs: list[Any] | None, i: int) -> Any:
    return None if xs is None or i >= len(xs) else xs[i]


def find_results(path: Path) -> Path:
    if path.is_file():
        return path
    files = [f for f in path.rglob("*.json") if f.name not in ("machine.json", "benchmarks.json")]
    if not files:
        sys.exit(f"no asv results under {path}: run `asv run` first (see benchmarks/asv.conf.json)")
    return max(files, key=lambda f: f.stat().st_mtime)


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_t(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 0:
        return "-" + fmt_t(-s)
    for unit, k in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= k:
            return f"{s / k:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt_r(r: float | None, digits: int = 2) -> str:
    return "—" if r is None else f"**{r:.{digits}f}**"


def fmt_x(r: float | None, digits: int = 2) -> str:
    return "—" if r is None else f"{r:.{digits}f}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "-" * len(header)
    seps = [":---" if a == "l" else "---:" for a in align.replace("-", "r")]
    return (
        ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
        + ["| " + " | ".join(r) + " |" for r in rows]
        + [""]
    )


def verdict(v: float | None, limit: float | None) -> str:
    if v is None:
        return "not measured"
    if limit is None:
        return "—"
    return "pass" if v <= limit else "**fail**"


# --------------------------------------------------------------------------------------------
# The sections

#: (label, time benchmark name for fwd, for fwd+bwd, native impl's name, native label, has dtype)
FRAMEWORKS = (
    (
        "torch eager",
        "cross_entropy.TorchEager.time_fwd",
        "cross_entropy.TorchEager.time_fwd_bwd",
        "native",
        "F.cross_entropy",
        True,
    ),
    (
        "torch.compile",
        "cross_entropy.TorchCompileFwd.time_call",
        "cross_entropy.TorchCompileFwdBwd.time_call",
        "native",
        "F.cross_entropy",
        False,
    ),
    (
        "jax.jit",
        "cross_entropy.JaxJitFwd.time_call",
        "cross_entropy.JaxJitValueAndGrad.time_call",
        "optax",
        "optax",
        True,
    ),
)
NUMPY = "cross_entropy.NumPy.time_call"


def _fw_time(res: Results, fw: tuple[Any, ...], passes: int, s: str, dtype: str, impl: str) -> float | None:
    name = fw[1 + passes]
    return res.get(name, s, dtype, impl) if fw[5] else (res.get(name, s, impl) if dtype == "float32" else None)


def _points(res: Results, name: str, with_dtype: bool) -> list[tuple[str, str]]:
    keys = res.bench.get(name, {})
    pts = {(k[0], k[1] if with_dtype else "float32") for k in keys}
    return sorted(pts, key=lambda p: (p[1] != "float32", shape(p[0])))


def section_acceptance(res: Results) -> list[str]:
    a, f32 = ACCEPT, "float32"
    te = FRAMEWORKS[0]
    logits = ITEMSIZE[f32] * shape(a)[0] * shape(a)[1]
    t_mx, t_nat = _fw_time(res, te, 1, a, f32, "multixent"), _fw_time(res, te, 1, a, f32, "native")
    m_mx = ratio(res.extra("cross_entropy.TorchEagerMemory", "fwd_bwd", a, f32, "multixent"), logits)
    m_nat = ratio(res.extra("cross_entropy.TorchEagerMemory", "fwd_bwd", a, f32, "native"), logits)
    jx = FRAMEWORKS[2]
    j_mx, j_nat = _fw_time(res, jx, 1, a, f32, "multixent"), _fw_time(res, jx, 1, a, f32, "optax")
    jm_mx = res.get("cross_entropy.JaxJitMemory.track_fwd_bwd", a, f32, "multixent")
    jm_nat = res.get("cross_entropy.JaxJitMemory.track_fwd_bwd", a, f32, "optax")
    n_mx, n_sp = res.get(NUMPY, a, "multixent"), res.get(NUMPY, a, "scipy")
    n_ag, n_hand = res.get(NUMPY, a, "multixent_and_grad"), res.get(NUMPY, a, "numpy_grad")
    c_mx, c_nat = (
        _fw_time(res, FRAMEWORKS[1], 1, a, f32, "multixent"),
        _fw_time(res, FRAMEWORKS[1], 1, a, f32, "native"),
    )
    items = [
        (
            "torch eager fwd+bwd time, multixent / `F.cross_entropy`",
            ratio(t_mx, t_nat),
            1.0,
            f"{fmt_t(t_mx)} vs {fmt_t(t_nat)}",
        ),
        ("torch eager fwd+bwd peak extra memory ÷ logits bytes", m_mx, 1.05, f"native {fmt_x(m_nat)}"),
        (
            "`jax.jit` value_and_grad time, multixent / optax",
            ratio(j_mx, j_nat),
            1.05,
            f"{fmt_t(j_mx)} vs {fmt_t(j_nat)}",
        ),
        ("`jax.jit` value_and_grad temp+output ÷ logits bytes", jm_mx, 1.05, f"optax {fmt_x(jm_nat, 3)}"),
        (
            "NumPy forward, multixent / SciPy `log_softmax` + `take_along_axis`",
            ratio(n_mx, n_sp),
            1.0,
            f"{fmt_t(n_mx)} vs {fmt_t(n_sp)}",
        ),
        (
            "NumPy `cross_entropy_and_grad` / hand-written `(softmax - onehot) / N`",
            ratio(n_ag, n_hand),
            1.0,
            f"{fmt_t(n_ag)} vs {fmt_t(n_hand)}",
        ),
        ("NumPy `cross_entropy_and_grad` ÷ multixent's forward", ratio(n_ag, n_mx), 1.5, ""),
        ("`torch.compile` fwd+bwd time, both compiled", ratio(c_mx, c_nat), None, f"{fmt_t(c_mx)} vs {fmt_t(c_nat)}"),
    ]
    n, c = shape(a)
    rows = [[w, fmt_x(v, 3), "—" if lim is None else f"≤ {lim}", verdict(v, lim), d] for w, v, lim, d in items]
    return [
        f"## Acceptance point (N={n}, C={c}, float32, forward+backward)",
        "",
        *table(["measured", "value", "limit", "result", "detail"], rows, "lrrll"),
    ]


def section_fixed_cost(res: Results) -> list[str]:
    s = SHAPES[0]
    rows = []
    for fw in FRAMEWORKS:
        for p, pname in ((0, "fwd"), (1, "fwd+bwd")):
            mx, nat = _fw_time(res, fw, p, s, "float32", "multixent"), _fw_time(res, fw, p, s, "float32", fw[3])
            if mx is None and nat is None:
                continue
            rows.append(
                [
                    fw[0],
                    pname,
                    fmt_t(mx),
                    f"{fmt_t(nat)} ({fw[4]})",
                    fmt_r(ratio(mx, nat)),
                    fmt_t(None if mx is None or nat is None else mx - nat),
                ]
            )
    for impl, nat, pname in (("multixent", "scipy", "fwd"), ("multixent_and_grad", "numpy_grad", "and_grad")):
        mx, nt = res.get(NUMPY, s, impl), res.get(NUMPY, s, nat)
        if mx is not None or nt is not None:
            rows.append(
                [
                    "numpy",
                    pname,
                    fmt_t(mx),
                    f"{fmt_t(nt)} ({nat})",
                    fmt_r(ratio(mx, nt)),
                    fmt_t(None if mx is None or nt is None else mx - nt),
                ]
            )
    n, c = shape(s)
    return [
        f"## Fixed per-call cost (N={n}, C={c}, float32: the smallest point, where the work is negligible)",
        "",
        *table(["framework", "pass", "multixent", "native", "ratio", "multixent - native"], rows, "llrrrr"),
    ]


def section_time(res: Results) -> list[str]:
    out = ["## Time (asv medians; ratio = multixent / native, same run)", ""]
    fixed = SHAPES[0]
    for fw in FRAMEWORKS:
        pts = _points(res, fw[1], fw[5]) or _points(res, fw[2], fw[5])
        if not pts:
            continue
        fx = [_fw_time(res, fw, p, fixed, "float32", i) for p in (0, 1) for i in ("multixent", fw[3])]
        out += [f"### {fw[0]} (native: {fw[4]})", ""]
        if any(v is not None for v in fx):
            out += [
                f"Fixed per-call cost ({fixed}, fwd / fwd+bwd): multixent {fmt_t(fx[0])} / {fmt_t(fx[2])},"
                f" native {fmt_t(fx[1])} / {fmt_t(fx[3])}.",
                "",
            ]
        rows = []
        for s, dtype in pts:
            t = [_fw_time(res, fw, p, s, dtype, i) for p in (0, 1) for i in ("multixent", fw[3])]
            n, c = shape(s)
            rows.append(
                [
                    str(n),
                    str(c),
                    dtype,
                    fmt_t(t[0]),
                    fmt_t(t[1]),
                    fmt_r(ratio(t[0], t[1])),
                    fmt_t(t[2]),
                    fmt_t(t[3]),
                    fmt_r(ratio(t[2], t[3])),
                ]
            )
        out += table(
            ["N", "C", "dtype", "fwd: multixent", fw[4], "ratio", "fwd+bwd: multixent", fw[4], "ratio"],
            rows,
            "rrlrrrrrr",
        )
    pts = _points(res, NUMPY, False)
    if pts:
        out += [
            "### numpy, float32 (native: SciPy `log_softmax` + `take_along_axis`; for the gradient, "
            "`(scipy.special.softmax(x) - onehot(y)) / N`)",
            "",
        ]
        rows = []
        for s, _ in pts:
            t = [res.get(NUMPY, s, i) for i in ("multixent", "scipy", "multixent_and_grad", "numpy_grad")]
            n, c = shape(s)
            rows.append(
                [
                    str(n),
                    str(c),
                    fmt_t(t[0]),
                    fmt_t(t[1]),
                    fmt_r(ratio(t[0], t[1])),
                    fmt_t(t[2]),
                    fmt_t(t[3]),
                    fmt_r(ratio(t[2], t[3])),
                    fmt_x(ratio(t[2], t[0])),
                ]
            )
        out += table(
            [
                "N",
                "C",
                "fwd: multixent",
                "scipy",
                "ratio",
                "and_grad: multixent",
                "hand-written",
                "ratio",
                "and_grad ÷ multixent fwd",
            ],
            rows,
        )
    return out


#: Issue 12's bars by the native loss's time: the band's upper bound (seconds) and its name.
BANDS = ((0.2e-3, "< 0.2 ms"), (2e-3, "0.2-2 ms"), (math.inf, "≥ 2 ms"))

#: (case, row of :data:`FRAMEWORKS`, pass (0 fwd, 1 fwd+bwd), bar per band); NumPy's rows: :func:`section_bars`
BARS = (
    ("torch eager fwd+bwd", 0, 1, (2.0, 1.3, 1.0)),
    ("torch eager fwd (`no_grad`)", 0, 0, (3.0, 1.5, 1.0)),
    ("`jax.jit` fwd", 2, 0, (1.1, 1.1, 1.1)),
    ("`jax.jit` value_and_grad", 2, 1, (1.1, 1.1, 1.1)),
)


def _band(native: float) -> int:
    return next(i for i, (top, _) in enumerate(BANDS) if native < top)


def section_bars(res: Results) -> list[str]:
    """Issue 12's bars: per case, native-time band and dtype, the worst ratio and its point."""
    rows = []

    def row(case: str, points: list[tuple[str, str, float, float]], bars: tuple[float, ...]) -> None:
        cells = []
        for band in range(len(BANDS)):
            worst = []
            for dtype in ("float32", "bfloat16"):
                got = [(mx / nat, s) for s, d, mx, nat in points if d == dtype and _band(nat) == band]
                if got:
                    r, s = max(got)
                    worst.append(f"{'**' if r > bars[band] else ''}{r:.2f}{'**' if r > bars[band] else ''} ({s})")
            cells.append(" / ".join(worst) or "—")
        rows.append([case, *cells, " / ".join(f"{b:g}" for b in bars)])

    for case, fw_i, passes, bars in BARS:
        fw = FRAMEWORKS[fw_i]
        points = []
        for s, dtype in _points(res, fw[1 + passes], fw[5]):
            mx, nat = (_fw_time(res, fw, passes, s, dtype, i) for i in ("multixent", fw[3]))
            if mx is not None and nat is not None:
                points.append((s, dtype, mx, nat))
        row(case, points, bars)
    numpy_points = {"fwd": [], "and_grad": []}
    for s, _ in _points(res, NUMPY, False):
        for case, mine, native in (("fwd", "multixent", "scipy"), ("and_grad", "multixent_and_grad", "numpy_grad")):
            mx, nat = res.get(NUMPY, s, mine), res.get(NUMPY, s, native)
            if mx is not None and nat is not None:
                numpy_points[case].append((s, "float32", mx, nat))
    smallest = SHAPES[0]
    fwd = numpy_points["fwd"]
    row("NumPy fwd at the smallest point", [p for p in fwd if p[0] == smallest], (1.5, 1.5, 1.5))
    row("NumPy fwd from the next point up", [p for p in fwd if p[0] != smallest], (1.0, 1.0, 1.0))
    row("NumPy `cross_entropy_and_grad`", numpy_points["and_grad"], (1.0, 1.0, 1.0))
    return [
        "## Issue 12's bars, by the native loss's time",
        "",
        "The worst ratio (multixent / native) in each band of the native's time, float32 / bfloat16, with its point;"
        " bold: above the bar.",
        "",
        *table(["case", *(name for _, name in BANDS), "bars"], rows, "lllll"),
    ]


#: The in-process ratio benchmarks: (class, its columns as (track_ method, heading)), one table each.
IN_PROCESS = (
    (
        "TorchEagerRatio",
        "torch eager, multixent / `F.cross_entropy`",
        (("fwd", "fwd (`no_grad`)"), ("fwd_bwd", "fwd+bwd")),
    ),
    ("JaxJitRatio", "`jax.jit`, multixent / optax", (("fwd", "fwd"), ("fwd_bwd", "value_and_grad"))),
    (
        "NumPyRatio",
        "NumPy float32, multixent / SciPy",
        (("fwd", "fwd (`log_softmax`)"), ("and_grad", "`cross_entropy_and_grad` (`(softmax - onehot) / N`)")),
    ),
)


def section_in_process(res: Results) -> list[str]:
    """multixent / native timed in one process (``TorchEagerRatio``, ``JaxJitRatio``, ``NumPyRatio``)."""
    out: list[str] = []
    for cls, title, columns in IN_PROCESS:
        names = [f"cross_entropy.{cls}.track_{m}" for m, _ in columns]
        points = sorted(
            {p for n in names for p in res.bench.get(n, {})},
            key=lambda p: (p[1:] not in ((), ("float32",)), shape(p[0])),  # float32 first
        )
        if not points:
            continue
        rows = [[*map(str, shape(p[0])), *p[1:], *(fmt_x(res.get(n, *p)) for n in names)] for p in points]
        dtype = ["dtype"] if len(points[0]) > 1 else []
        out += [f"### {title}", ""]
        out += table(["N", "C", *dtype, *(h for _, h in columns)], rows, "rr" + "l" * len(dtype) + "r" * len(columns))
        out += [""]
    if not out:
        return []
    return [
        "## Both losses in one process",
        "",
        "multixent / the native loss, each the best of 7 alternating rounds of ~50 ms in one process"
        " (`TorchEagerRatio`, `JaxJitRatio`, `NumPyRatio`): free of the process-to-process spread of the"
        " time tables' ratios.",
        "",
        *out[:-1],
    ]


def section_memory(res: Results) -> list[str]:
    out = ["## Peak extra memory ÷ logits bytes", ""]
    cls = "cross_entropy.TorchEagerMemory"
    keys = sorted(
        {k[:2] for k in res.bench.get(f"{cls}.peakmem_baseline", {})}, key=lambda p: (p[1] != "float32", shape(p[0]))
    )
    if keys:
        rows = []
        for s, dtype in keys:
            lb = shape(s)[0] * shape(s)[1] * ITEMSIZE[dtype]
            v = [ratio(res.extra(cls, p, s, dtype, i), lb) for p in ("fwd", "fwd_bwd") for i in ("multixent", "native")]
            rows.append([*map(str, shape(s)), dtype, f"{lb / 2**20:.1f}", *(fmt_x(x) for x in v)])
        out += ["### torch eager (asv `peakmem_*` minus `peakmem_baseline`; fwd+bwd includes the 1× `.grad`)", ""]
        out += table(
            [
                "N",
                "C",
                "dtype",
                "logits MiB",
                "fwd: multixent",
                "F.cross_entropy",
                "fwd+bwd: multixent",
                "F.cross_entropy",
            ],
            rows,
            "rrlrrrrr",
        )
    cls = "cross_entropy.NumPyMemory"
    keys = sorted({k[0] for k in res.bench.get(f"{cls}.peakmem_baseline", {})}, key=shape)
    if keys:
        rows = []
        for s in keys:
            lb = shape(s)[0] * shape(s)[1] * 4
            v = [
                ratio(res.extra(cls, "call", s, i), lb)
                for i in ("multixent", "scipy", "multixent_and_grad", "numpy_grad")
            ]
            rows.append([*map(str, shape(s)), f"{lb / 2**20:.1f}", *(fmt_x(x) for x in v)])
        out += ["### numpy, float32 (asv `peakmem_call` minus `peakmem_baseline`)", ""]
        out += table(
            ["N", "C", "logits MiB", "multixent fwd", "scipy fwd", "multixent and_grad", "hand-written grad"], rows
        )
    name = "cross_entropy.JaxJitMemory.track_fwd_bwd"
    pts = _points(res, name, True)
    if pts:
        rows = []
        for s, dtype in pts:
            v = [
                res.get(f"cross_entropy.JaxJitMemory.track_{p}", s, dtype, i)
                for p in ("fwd_bwd", "fwd")
                for i in ("multixent", "optax")
            ]
            rows.append([*map(str, shape(s)), dtype, *(fmt_x(x, 3) for x in v)])
        out += ["### jax.jit (`memory_analysis()`: temp + output bytes)", ""]
        out += table(
            ["N", "C", "dtype", "value_and_grad: multixent", "optax", "fwd: multixent", "optax"], rows, "rrlrrrr"
        )
    return out


def section_options(res: Results) -> list[str]:
    torch_cls, jax_name = "options.TorchOptionsMemory", "options.JaxOptionsMemory.track_fwd_bwd"
    opts = sorted(
        {k[0] for k in res.bench.get(f"{torch_cls}.peakmem_baseline", {})}
        | {k[0] for k in res.bench.get(jax_name, {})},
        key=lambda o: (o != "none", o),
    )
    if not opts:
        return []
    n, c = shape(ACCEPT)
    lb = n * c * 4
    rows = []
    for o in opts:
        t = [ratio(res.extra(torch_cls, "fwd_bwd", o, i), lb) for i in ("multixent", "native")]
        j = [res.get(jax_name, o, i) for i in ("multixent", "optax")]
        rows.append([o, fmt_x(t[0], 3), fmt_x(t[1], 3), fmt_x(j[0], 3), fmt_x(j[1], 3)])
    return [
        f"## Memory per option (N={n}, C={c}, float32, forward+backward; limit 1.05 for multixent)",
        "",
        "softcap=30, label_smoothing=0.1, class weights, z_loss=1e-4; the native loss computes the same option.",
        "",
        *table(["option", "torch eager: multixent", "F.cross_entropy", "jax.jit: multixent", "optax"], rows, "lrrrr"),
    ]


def section_linear(res: Results) -> list[str]:
    vs = sorted(
        {
            k[0]
            for name in (
                "linear.TorchLinear.time_fwd_bwd",
                "linear.TorchLinearMemory.peakmem_baseline",
                "linear.JaxLinear.time_fwd_bwd",
                "linear.JaxLinearMemory.track_fwd_bwd",
            )
            for k in res.bench.get(name, {})
        }
    )
    if not vs:
        return []
    rows = []
    for fw in ("torch eager", "jax.jit"):
        for v in vs:
            lb = LINEAR_N * v * 4
            if fw == "torch eager":
                t = [res.get("linear.TorchLinear.time_fwd_bwd", v, i) for i in ("fused", "naive")]
                m = [ratio(res.extra("linear.TorchLinearMemory", "fwd_bwd", v, i), lb) for i in ("fused", "naive")]
            else:
                t = [res.get("linear.JaxLinear.time_fwd_bwd", v, i) for i in ("fused", "naive")]
                m = [res.get("linear.JaxLinearMemory.track_fwd_bwd", v, i) for i in ("fused", "naive")]
            if all(x is None for x in t + m):
                continue
            rows.append(
                [
                    fw,
                    str(v),
                    f"{lb / 2**20:,.0f} MiB",
                    fmt_t(t[0]),
                    fmt_t(t[1]),
                    fmt_r(ratio(t[0], t[1])),
                    fmt_x(m[0]),
                    fmt_x(m[1]),
                ]
            )
    return [
        f"## linear_cross_entropy: fused vs naive `h @ W.T` (N={LINEAR_N}, D={LINEAR_D}, fp32, forward+backward)",
        "",
        f"Acceptance at V={LINEAR_ACCEPT_V}: fused memory ≤ 0.25× logits, time ≤ 1.2× naive. Memory: torch peak RSS"
        " beyond the inputs (gradients included), JAX `memory_analysis()` (the naive path above V=32768 is"
        " compiled, not run).",
        "",
        *table(
            [
                "framework",
                "V",
                "logits",
                "fused time",
                "naive time",
                "fused / naive",
                "fused memory ÷ logits",
                "naive memory ÷ logits",
            ],
            rows,
            "lrrrrrrr",
        ),
    ]


def section_distributed(res: Results) -> list[str]:
    """Issue 11's vocabulary-parallel cases (``cases/distributed.py``): 2 gloo ranks, per-rank figures."""
    from cases.distributed import LINEAR_V, WORLD, C, N

    def get(name: str, impl: str) -> float | None:
        v = res.get(f"distributed.{name}", impl)
        return None if v is None or v != v else v  # asv records a skipped case as NaN

    t = [get("TorchVocabParallel.track_time_per_rank", i) for i in ("multixent", "loss_parallel")]
    m = [get("TorchVocabParallel.track_peak_extra_memory", i) for i in ("multixent", "loss_parallel")]
    lin = get("TorchLinearVocabParallel.track_peak_extra_memory", "multixent")
    if all(x is None for x in (*t, *m, lin)):
        return []
    rows = [
        ["time per rank, multixent / `loss_parallel()` F.cross_entropy", fmt_r(ratio(t[0], t[1])), "≤ 1.0"],
        ["", f"{fmt_t(t[0])} vs {fmt_t(t[1])}", ""],
        ["peak extra memory per rank ÷ local logits, multixent", fmt_r(m[0]), "≤ 1.05"],
        ["the same, `loss_parallel()`", fmt_x(m[1]), "—"],
        [
            f"`linear_cross_entropy` (N={LINEAR_N}, D={LINEAR_D}, V={LINEAR_V} over {WORLD} ranks):"
            " memory ÷ local logits",
            fmt_r(lin) if lin is not None else "not run (no group= in linear_cross_entropy)",
            "≤ 0.25",
        ],
    ]
    return [
        f"## Distributed: vocabulary parallelism on {WORLD} gloo processes",
        "",
        f"torch DTensor logits `Shard(1)` (N={N}, C={C} fp32: {C // WORLD} classes per rank), forward+backward of the"
        " mean loss, one torch thread per rank; multixent against torch's `loss_parallel()` + `F.cross_entropy`"
        " on the same DTensor. Time: the median of 5 calls, the slower rank's. Memory: a rank's peak RSS during"
        " one call beyond its RSS before it (`VmHWM`, reset through `/proc/self/clear_refs`; the gradient counts),"
        " ÷ its local logits' bytes, the larger rank's; each figure from fresh processes.",
        "",
        *table(["measured", "value", "limit"], rows, "lrr"),
    ]


SECTIONS: list[Callable[[Results], list[str]]] = [
    section_acceptance,
    section_fixed_cost,
    section_bars,
    section_in_process,
    section_time,
    section_memory,
    section_options,
    section_linear,
    section_distributed,
]


def header(res: Results) -> list[str]:
    m = res.meta["params"]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(min(res.started) / 1000)) if res.started else "?"
    end = time.strftime("%H:%M UTC", time.gmtime(max(res.started) / 1000)) if res.started else "?"
    return [
        "# multixent benchmark",
        "",
        "Made by asv (`asv run --python=same`, see `benchmarks/asv.conf.json`) and `benchmarks/report.py`:"
        " each benchmark and parameter combination in fresh processes; multixent and the native loss are"
        " parameters (`impl`) of the same benchmark in the same run, and every ratio is multixent / native"
        " (below 1 is better for multixent). Cross-entropy with class-index targets, mean reduction, torch"
        " with 2 threads.",
        "",
        *(
            ["**Tiny grid (`MULTIXENT_BENCH_GRID=tiny`): a check of the pipeline, not a measurement.**", ""]
            if TINY
            else []
        ),
        f"- Machine: {m.get('cpu')}, {m.get('num_cpu')} cores, {int(m.get('ram', 0)) / 2**30:.0f} GiB, {m.get('os')};"
        f" Python {res.meta.get('python')}",
        f"- Code: multixent at `{res.meta['commit_hash'][:8]}`; benchmarks started {when} to {end}",
        f"- Raw results: `asv_results.json` (asv's `{res.path.name}`)",
        *(
            [f"- **Failed** (no result; see asv's output): {', '.join(f'`{n}`' for n in res.failed)}"]
            if res.failed
            else []
        ),
        "",
    ]


def write_plot_cross_entropy(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [
        d
        for d in ("float32", "bfloat16")
        if any(p[1] == d for fw in FRAMEWORKS for p in _points(res, fw[1], fw[5]))
        or (d == "float32" and NUMPY in res.bench)
    ]
    if not dtypes:
        return
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(13, 4.5 * len(dtypes)), squeeze=False)
    colors = {"torch eager": "C0", "torch.compile": "C1", "jax.jit": "C2", "numpy": "C3"}
    for row, dtype in enumerate(dtypes):
        for p, title in ((0, "forward"), (1, "forward+backward")):
            ax = axes[row][p]
            for fw in FRAMEWORKS:
                pts = sorted(
                    (
                        shape(s)[0] * shape(s)[1],
                        ratio(_fw_time(res, fw, p, s, dtype, "multixent"), _fw_time(res, fw, p, s, dtype, fw[3])),
                    )
                    for s, d in _points(res, fw[1 + p], fw[5])
                    if d == dtype
                )
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), "o-", color=colors[fw[0]], label=fw[0])
            if dtype == "float32":
                impls = ("multixent", "scipy") if p == 0 else ("multixent_and_grad", "numpy_grad")
                pts = sorted(
                    (shape(s)[0] * shape(s)[1], ratio(res.get(NUMPY, s, impls[0]), res.get(NUMPY, s, impls[1])))
                    for s, _ in _points(res, NUMPY, False)
                )
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        "s--",
                        color=colors["numpy"],
                        label="numpy" + ("" if p == 0 else " and_grad vs hand-written"),
                    )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="logits N·C",
                ylabel="time, multixent / native",
                title=f"{title} ({dtype})",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"multixent cross-entropy vs the native losses — {res.meta['params'].get('cpu')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plot_linear(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "torch time (s)": ("linear.TorchLinear.time_fwd_bwd", None),
        "torch memory ÷ logits": ("linear.TorchLinearMemory", "extra"),
        "jax.jit time (s)": ("linear.JaxLinear.time_fwd_bwd", None),
        "jax.jit memory ÷ logits": ("linear.JaxLinearMemory.track_fwd_bwd", None),
    }
    vs = sorted(
        {
            k[0]
            for n in (
                "linear.TorchLinearMemory.peakmem_baseline",
                "linear.JaxLinearMemory.track_fwd_bwd",
                "linear.JaxLinear.time_fwd_bwd",
            )
            for k in res.bench.get(n, {})
        }
    )
    if not vs:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (title, (name, kind)) in zip(axes, series.items(), strict=True):
        for j, impl in enumerate(("fused", "naive")):
            ys = [
                ratio(res.extra(name, "fwd_bwd", v, impl), LINEAR_N * v * 4) if kind else res.get(name, v, impl)
                for v in vs
            ]
            xs = [i + 0.2 * (2 * j - 1) for i in range(len(vs))]
            ax.bar(xs, [y or 0 for y in ys], width=0.4, label=impl, color=f"C{j}")
        ax.set_xticks(range(len(vs)), [f"V={v}" for v in vs])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"linear_cross_entropy, fused vs naive (N={LINEAR_N}, D={LINEAR_D}, fp32, fwd+bwd)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / ".asv" / "results", help="asv results file or directory")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    args = p.parse_args(argv)
    path = find_results(args.results)
    res = Results(path)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = header(res)
    for section in SECTIONS:
        lines += section(res)
    lines += ["![cross-entropy](cross_entropy.png)", "", "![linear cross-entropy](linear.png)", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    shutil.copyfile(path, args.out / "asv_results.json")
    try:
        write_plot_cross_entropy(res, args.out / "cross_entropy.png")
        write_plot_linear(res, args.out / "linear.png")
    except ImportError as err:
        print(f"no plots: {err}")
    print("\n".join(section_acceptance(res)))
    print(f"wrote {args.out / 'results.md'}, cross_entropy.png, linear.png, asv_results.json from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
