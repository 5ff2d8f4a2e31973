"""Before and after in one run: multixent at a git revision (before) against the working tree (after).

    python benchmarks/ab.py 551b1ec             # before: that revision; after: this checkout
    python benchmarks/ab.py HEAD~1 --rounds 15

Both packages are imported into one process (the revision's ``multixent`` exported with ``git archive``,
the working tree's under the name ``multixent_after``), and at each acceptance point the two and the
native loss are timed by the asv cases' harness (:func:`cases.cross_entropy.alternating_best`: the best
of alternating rounds): torch eager and ``jax.jit`` forward and forward+backward, NumPy's forward, at
64x10 and 512x1000, and torch's forward+backward at 4096x32000. A process of each package's own measures
the peak memory of that forward+backward beyond its inputs, ÷ the logits' bytes (peak RSS is a process's).
The table gives each against the native loss and after / before.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL = ("64x10", "512x1000")
LARGE = "4096x32000"


def export(revision: str, into: Path) -> Path:
    """The revision's ``multixent`` package under ``into``; returns the folder to put on ``sys.path``."""
    archive = subprocess.run(["git", "archive", revision, "multixent"], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def load(folder: Path, name: str) -> Any:
    """The ``multixent`` package in ``folder`` imported as ``name``."""
    init = folder / "multixent" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def torch_points(before: Any, after: Any, rounds: int) -> dict[str, list[float]]:
    import torch
    import torch.nn.functional as F
    from cases import cross_entropy as ce

    def no_grad(f: Callable[..., Any], x: Any, y: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                f(x, y)

        return run

    def with_grad(f: Callable[..., Any], x: Any, y: Any) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            f(x, y).backward()

        return run

    losses = (before.cross_entropy, after.cross_entropy, F.cross_entropy)
    out = {}
    for s in (*SMALL, LARGE):
        x, y = ce.torch_inputs(*ce.shape(s))
        if s != LARGE:
            out[f"torch fwd {s}"] = ce.alternating_best(*(no_grad(f, x, y) for f in losses), rounds=rounds)
        x.requires_grad_(True)
        out[f"torch fwd+bwd {s}"] = ce.alternating_best(*(with_grad(f, x, y) for f in losses), rounds=rounds)
    return out


def jax_points(before: Any, after: Any, rounds: int) -> dict[str, list[float]]:
    import jax
    import optax
    from cases import cross_entropy as ce

    losses = (before.cross_entropy, after.cross_entropy, optax.softmax_cross_entropy_with_integer_labels)
    scalar = [lambda x, y, f=f: f(x, y) for f in losses[:2]] + [lambda x, y: losses[2](x, y).mean()]
    out = {}
    for s in SMALL:
        x, y = ce.jax_inputs(*ce.shape(s))
        for name, transform in (("fwd", lambda f: f), ("fwd+bwd", jax.value_and_grad)):
            fs = [jax.jit(transform(f)) for f in scalar]
            calls = (lambda f=f, x=x, y=y: jax.block_until_ready(f(x, y)) for f in fs)
            out[f"jax.jit {name} {s}"] = ce.alternating_best(*calls, rounds=rounds)
    return out


def numpy_points(before: Any, after: Any, rounds: int) -> dict[str, list[float]]:
    from cases import cross_entropy as ce

    out = {}
    for s in SMALL:
        x, y = ce.numpy_inputs(*ce.shape(s))
        fs = (before.cross_entropy, after.cross_entropy, ce.scipy_cross_entropy)
        out[f"numpy fwd {s}"] = ce.alternating_best(*(lambda f=f, x=x, y=y: f(x, y) for f in fs), rounds=rounds)
    return out


def peak_memory(folder: str) -> None:
    """Prints the peak RSS of torch's forward+backward at the large point beyond its inputs, ÷ the logits' bytes."""
    sys.path[:0] = [folder, str(HERE)]
    from cases import cross_entropy as ce

    import multixent

    assert multixent.__file__.startswith(folder), multixent.__file__
    case = ce.TorchEagerMemory()
    case.setup(LARGE, "float32", "multixent")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    case.peakmem_fwd_bwd(LARGE, "float32", "multixent")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * 1024 / ce.logits_bytes(LARGE))  # KiB


def memory_of(folder: Path) -> float:
    run = subprocess.run([sys.executable, __file__, "--memory", str(folder)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return float(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", nargs="?", help="before: a git revision (after: the working tree)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per point (default 15)")
    parser.add_argument("--memory", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        peak_memory(args.memory)
        return
    if args.revision is None:
        parser.error("a revision to compare against is required")
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(args.revision, Path(tmp))
        # first, while this process is small: a child's peak RSS starts at its parent's at the fork
        memory = (memory_of(folder), memory_of(ROOT))
        before, after = load(folder, "multixent"), load(ROOT, "multixent_after")
        times = {}
        for points in (torch_points, jax_points, numpy_points):
            times.update(points(before, after, args.rounds))
    print(f"before: {args.revision}; after: the working tree; the best of {args.rounds} alternating rounds\n")
    print("| point | before / native | after / native | after / before |\n| :--- | ---: | ---: | ---: |")
    for point, (b, a, native) in times.items():
        print(f"| {point} | {b / native:.3f} | {a / native:.3f} | {a / b:.3f} |")
    name = f"torch fwd+bwd {LARGE}, peak memory beyond the inputs (x logits)"
    print(f"| {name} | {memory[0]:.3f} | {memory[1]:.3f} | {memory[1] / memory[0]:.3f} |")


if __name__ == "__main__":
    main()
