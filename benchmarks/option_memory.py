"""torch eager peak extra memory per option at N=4096, C=32000 fp32, forward+backward (issue 12, item 6).

``python benchmarks/option_memory.py``: one fresh process per (option, loss), the code path of
``benchmarks/cases/options.py`` (its losses and inputs); the figure is the peak RSS during the
call (``VmHWM`` after writing 5 to ``/proc/self/clear_refs``) beyond the RSS before it, divided
by the logits' bytes. The gradient itself is 1.0.
"""

from __future__ import annotations

import subprocess
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def measure(option: str, impl: str) -> float:
    from cases.options import ACCEPT, TorchOptionsMemory, logits_bytes  # type: ignore[import-not-found]

    case = TorchOptionsMemory()
    case.setup(option, impl)
    f, x, y = case.f, case.x, case.y
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status("VmRSS")
    f(x, y).backward()
    return (_status("VmHWM") - before) / logits_bytes(ACCEPT)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        print(f"{measure(sys.argv[1], sys.argv[2]):.3f}")
        sys.exit()
    from cases.options import OPTIONS  # type: ignore[import-not-found]

    print(f"{'option':16} {'multixent':>10} {'native':>8}")
    for option in OPTIONS:
        figures = [
            subprocess.run(
                [sys.executable, __file__, option, impl], capture_output=True, text=True, check=True
            ).stdout.strip()
            for impl in ("multixent", "native")
        ]
        print(f"{option:16} {figures[0]:>10} {figures[1]:>8}")
