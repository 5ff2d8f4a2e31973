"""Timing and memory helpers shared by the benchmarks (``bench.py``, and later ``bench_linear.py``).

Nothing here knows about cross-entropy; a benchmark describes its work as small callables.

Timing
    :func:`time_interleaved` times several callables *in the same process*, alternating between
    them round by round after a warm-up, and returns a :class:`Timing` (per-call seconds of every
    round) for each. Compare two of them with :func:`ratio` (ratio of medians) and
    :func:`paired_ratio` (median of the per-round ratios, which cancels slow drifts of a shared
    machine). Each callable must run its work to completion (``block_until_ready`` for JAX).

Memory
    :func:`peak_extra_rss` runs one measurement in a FRESH Python process: it imports a *factory*
    ``"module:function"`` (found on ``sys.path``, which in the worker starts with this directory),
    calls ``factory(**warmup_kwargs)()`` once (a tiny size, so library initialisation is not
    counted), then ``run = factory(**kwargs)`` (which must create and touch its inputs and return a
    zero-argument ``run``), resets the high-water mark by writing ``5`` to
    ``/proc/self/clear_refs``, reads ``VmRSS``, calls ``run()`` (keeping its result alive) and reads
    ``VmHWM``. The extra memory is ``VmHWM - VmRSS``: the peak beyond the inputs, including
    whatever ``run()`` leaves behind (e.g. a ``.grad``). Linux only.

    :func:`xla_memory` gives ``memory_analysis()`` of a ``jax.jit``-compiled function.

Environment
    :func:`machine_info` describes the machine and library versions (without importing the
    libraries); :func:`load_average` is a cheap noise indicator to record beside timings.

The worker entry point is ``python _measure.py --rss-worker MODULE:FUNC JSON``.

A second benchmark (run as ``python benchmarks/bench_x.py``, so this directory is on ``sys.path``)::

    import _measure as M

    t = M.time_interleaved({"mine": lambda: mine(x), "native": lambda: native(x)})
    print(M.ratio(t["mine"], t["native"]), M.paired_ratio(t["mine"], t["native"]), t["mine"].as_dict())

    # in bench_x.py, at module level (the worker imports it; keep heavy imports inside):
    def memory_case(impl, n):
        x = make_and_touch_inputs(n)
        return lambda: run(impl, x)

    out = M.peak_extra_rss("bench_x:memory_case", {"impl": "mine", "n": 4096},
                           warmup_kwargs={"impl": "mine", "n": 8})
    print(out["extra_bytes"] / logits_bytes)
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Per-call seconds of one callable, one sample per round (a sample may average ``number`` calls)."""

    samples: list[float]
    number: int = 1
    warmup_s: list[float] = field(default_factory=list)
    #: Per call, averaged over the timed samples: minor page faults, user and system CPU seconds
    #: (of the whole process, all threads; page faults and system time reveal fresh-memory costs).
    minflt: float = math.nan
    user_s: float = math.nan
    sys_s: float = math.nan
    #: True when the case was so slow that fewer rounds were run (see ``slow_call_s``).
    capped: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (a noise indicator)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median * 1e3,
            "q1_ms": self.q1 * 1e3,
            "q3_ms": self.q3 * 1e3,
            "min_ms": min(self.samples) * 1e3,
            "spread": self.spread,
            "number": self.number,
            "samples_ms": [s * 1e3 for s in self.samples],
            "warmup_ms": [s * 1e3 for s in self.warmup_s],
            "rounds": len(self.samples),
            "capped": self.capped,
            "minflt_per_call": self.minflt,
            "user_ms_per_call": self.user_s * 1e3,
            "sys_ms_per_call": self.sys_s * 1e3,
        }


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _call_n(fn: Callable[[], Any], number: int, usage: list[float] | None = None) -> float:
    """Seconds per call of ``number`` back-to-back calls, with the garbage collector off.

    With ``usage`` (a list of three floats), adds the calls' minor faults, user and system seconds.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if usage is not None:
            usage[0] += r1.ru_minflt - r0.ru_minflt
            usage[1] += r1.ru_utime - r0.ru_utime
            usage[2] += r1.ru_stime - r0.ru_stime
        return dt / number
    finally:
        if enabled:
            gc.enable()


def time_interleaved(
    cases: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 7,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    max_rounds: int | None = None,
    max_spread: float = 0.1,
    extra_budget_s: float = 30.0,
    slow_call_s: float | None = None,
    slow_rounds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Median-ready timings of ``cases``, alternating between them in one process.

    Each case is called ``warmup`` times (alternating), then ``number`` is chosen per case so one
    sample lasts at least ``min_sample_s`` (calls shorter than that are repeated back to back and
    averaged), then ``rounds`` rounds run every case once each: A,B,A,B,... with the starting case
    rotated each round (A,B / B,A / A,B ...) so no case always follows the same one.

    On a noisy machine: while some case's interquartile spread exceeds ``max_spread``, further
    rounds run, up to ``max_rounds`` in all, and only while the extra rounds have taken less than
    ``extra_budget_s`` seconds.

    A safety net for pathologically slow cases: when a warm-up call of some case takes longer than
    ``slow_call_s``, the warm-up stops there and only ``slow_rounds`` rounds run (the timings are
    marked ``capped``), so one slow case cannot take the whole run's time.
    """
    names = list(cases)
    warm: dict[str, list[float]] = {n: [] for n in names}
    capped = False
    for _ in range(max(1, warmup)):
        for n in names:
            warm[n].append(_call_n(cases[n], 1))
        if slow_call_s is not None and max(w[-1] for w in warm.values()) > slow_call_s:
            capped = True
            break
    number = {n: max(1, math.ceil(min_sample_s / max(min(warm[n]), 1e-9))) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    usage: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n in names}
    if capped:
        rounds = max_rounds = min(rounds, slow_rounds)
    limit = max(rounds, max_rounds or rounds)
    t_extra = None
    r = 0
    while r < limit:
        if r >= rounds:
            if t_extra is None:
                t_extra = time.perf_counter()
            noisy = any(Timing(samples[n]).spread > max_spread for n in names)
            if not noisy or time.perf_counter() - t_extra > extra_budget_s:
                break
        gc.collect()
        k = r % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(_call_n(cases[n], number[n], usage[n]))
        r += 1
        if progress is not None:
            progress(f"round {r}")
    out = {}
    for n in names:
        calls = len(samples[n]) * number[n]
        f, u, s = (v / calls for v in usage[n])
        out[n] = Timing(samples[n], number[n], warm[n], minflt=f, user_s=u, sys_s=s, capped=capped)
    return out


def ratio(a: Timing, b: Timing) -> float:
    """``median(a) / median(b)``."""
    return a.median / b.median


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a_r / b_r`` (both timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples, strict=True))


# --------------------------------------------------------------------------------------------
# Memory: peak RSS in a fresh process


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _rss_worker(spec: str, payload: str) -> dict[str, Any]:
    args = json.loads(payload)
    factory = _resolve(spec)
    t0 = time.perf_counter()
    if args.get("warmup_kwargs") is not None:
        run = factory(**args["warmup_kwargs"])
        keep = run()
        del run, keep
    gc.collect()
    rss_start = _status_kib("VmRSS")
    run = factory(**args["kwargs"])
    gc.collect()
    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    hwm_reset = _status_kib("VmHWM")
    t1 = time.perf_counter()
    keep = run()
    t2 = time.perf_counter()
    hwm = _status_kib("VmHWM")
    rss_after = _status_kib("VmRSS")
    del keep
    kib = 1024
    return {
        "extra_bytes": (hwm - rss_before) * kib,
        "retained_bytes": (rss_after - rss_before) * kib,
        "rss_before_bytes": rss_before * kib,
        "inputs_bytes": (rss_before - rss_start) * kib,
        "hwm_after_reset_bytes": hwm_reset * kib,
        "hwm_bytes": hwm * kib,
        "run_s": t2 - t1,
        "setup_s": t1 - t0,
    }


def peak_extra_rss(
    factory: str,
    kwargs: Mapping[str, Any],
    *,
    warmup_kwargs: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Peak RSS beyond the inputs of one ``factory(**kwargs)()`` call, in a fresh process.

    Returns the worker's numbers (bytes): ``extra_bytes`` (VmHWM after the call minus VmRSS
    right after the reset), ``retained_bytes`` (VmRSS after minus before), ``inputs_bytes``
    (RSS the factory added) and the raw counters. ``kwargs`` must be JSON-serialisable.
    ``env`` adds variables to the worker's environment (e.g. thread counts, malloc tuning).
    """
    payload = json.dumps(
        {"kwargs": dict(kwargs), "warmup_kwargs": None if warmup_kwargs is None else dict(warmup_kwargs)}
    )
    cmd = [sys.executable, str(HERE / "_measure.py"), "--rss-worker", factory, payload]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=str(HERE),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rss worker {factory} {payload} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Memory: XLA's static analysis


def xla_memory(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """``jax.jit(fn).lower(*args).compile().memory_analysis()`` as a dict of byte counts.

    ``temp_size_in_bytes + output_size_in_bytes`` is the scratch plus what the call returns,
    i.e. the memory beyond its arguments.
    """
    import jax

    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {k: int(getattr(stats, k)) for k in keys}


# --------------------------------------------------------------------------------------------
# Environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: Path = HERE.parent) -> dict[str, Any]:
    """Commit and uncommitted changes of the repository at ``path`` (what code was measured)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=path, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "describe": git("describe", "--always", "--dirty"),
        "status": git("status", "--short", "--untracked-files=no").splitlines(),
    }


def source_digest(path: Path) -> str:
    """sha256 over the ``*.py`` files under ``path`` (to notice code edited during a run)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.rglob("*.py")):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(
    packages: Sequence[str] = ("multixent", "numpy", "scipy", "torch", "jax", "jaxlib", "optax"),
) -> dict[str, Any]:
    """CPU model, core counts, memory, OS and package versions (read from metadata, not imported)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "mem_total_bytes": mem_total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "load_average_start": load_average(),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for a report: CPU model, cores, memory, OS, versions."""
    mem = info.get("mem_total_bytes")
    mem_s = f", {mem / 2**30:.0f} GiB RAM" if mem else ""
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return f"{info['cpu_model']}, {info['usable_cores']} cores{mem_s}, {info['os']}, Python {info['python']}; {vers}"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-worker":
        sys.path.insert(0, str(HERE))
        print(json.dumps(_rss_worker(sys.argv[2], sys.argv[3])), flush=True)
    else:
        print(__doc__)
