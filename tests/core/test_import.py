"""``import multixent`` (and using it on NumPy arrays) loads neither torch nor jax."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_loads_no_framework():
    result = _run(
        """
        import sys
        import multixent
        loaded = sorted(m for m in ("torch", "jax", "jaxlib", "optax", "keras") if m in sys.modules)
        assert not loaded, loaded
        print(sorted(multixent.__all__))
        """
    )
    assert result.returncode == 0, result.stderr
    for name in ("cross_entropy", "cross_entropy_and_grad", "log_softmax", "logsumexp", "nll_loss"):
        assert name in result.stdout


def test_numpy_use_loads_no_framework():
    result = _run(
        """
        import sys
        import numpy as np
        import multixent
        x, y = np.random.default_rng(0).normal(size=(4, 3)), np.array([0, 2, -100, 1])
        multixent.cross_entropy(x, y, label_smoothing=0.1, z_loss=0.1, softcap=2.0)
        multixent.cross_entropy_and_grad(x, y)
        multixent.nll_loss(multixent.log_softmax(x), y)
        multixent.logsumexp(x)
        loaded = sorted(m for m in ("torch", "jax", "jaxlib", "keras") if m in sys.modules)
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr


def test_main_job_agrees_with_the_native_losses():
    """``python -m multixent``: every installed backend shows the NumPy reference's loss, and exits 0."""
    result = subprocess.run([sys.executable, "-m", "multixent"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = [line.split() for line in result.stdout.splitlines() if " ok " in line]
    assert checked and checked[0][0] == "numpy", result.stdout
    assert {row[2] for row in checked} == {checked[0][3]}, result.stdout  # one loss: the reference's
