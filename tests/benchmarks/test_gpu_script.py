"""The GPU check's own parts, fast: ``benchmarks/passes.py``'s counts on operations whose traffic is known,
``benchmarks/gpu.py``'s parity on CPU tensors (the accelerator strategy forced) and its refusal to write dry
figures over the recorded report. The whole script in dry mode runs in ``nox -s gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _paths import load_script
from conftest import SELECTED

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif("torch" not in SELECTED, reason="torch backend not selected")

passes = load_script("benchmarks/passes.py", "multixent_bench_passes")
gpu = load_script("benchmarks/gpu.py", "multixent_bench_gpu")


def test_count_an_out_of_place_operation():
    """``x * 2`` on float32: one operation, reads 4 bytes and writes 4 per element."""
    x = torch.ones(300, 70)
    c = passes.count(lambda: x * 2)
    assert (c["ops"], c["logits_ops"], c["max_logits_touches"], c["host_reads"]) == (1, 1, 2, 0)
    assert c["bytes_per_logit"] == 8.0
    assert c["op_names"] == ["aten.mul"]


def test_views_are_not_operations_and_numel_sets_the_unit():
    """A transpose and a reshape move no memory; ``numel=`` divides by the logits' size given."""
    x = torch.ones(300, 70)
    c = passes.count(lambda: x.t().t().reshape(-1).add_(1), numel=2 * x.numel())
    assert c["op_names"] == ["aten.add_"]  # in place on a contiguous view: read and write the same bytes
    assert c["bytes_per_logit"] == 4.0  # 8 bytes per element over twice the elements
    assert c["logits_ops"] == 1


def test_a_python_number_wrapped_on_the_host_is_no_launch():
    """``torch.where(mask, x, 0.0)``: the 0 becomes a CPU ``scalar_tensor`` (an operation, no launch)."""
    x = torch.ones(300, 70)
    c = passes.count(lambda: torch.where(x > 0, x, 0.0))
    assert c["op_names"] == ["aten.gt", "aten.scalar_tensor", "aten.where"]
    assert (c["ops"], c["launches"]) == (3, 2)


def test_every_host_read_is_counted_once():
    x = torch.arange(6.0).reshape(2, 3)
    item = torch.Tensor.item
    c = passes.count(lambda: (x.sum().item(), x.tolist(), x.numpy(), bool(x[0, 1] > 0)))
    assert c["host_reads"] == 4
    assert passes.count(lambda: x + 1)["host_reads"] == 0
    assert torch.Tensor.item is item and "item" not in vars(torch.Tensor)  # the wrappers are gone after the call


def test_parity_check_flags_an_error_beyond_tolerance():
    ref = np.linspace(1.0, 2.0, 10)
    row = {"framework": "torch", "dtype": "float32", "case": "x", "reduction": "sum"}
    assert gpu.check(row, torch.tensor(ref * (1 + 1e-6)), None, ref, None)["ok"]
    off = gpu.check(row, torch.tensor(ref), torch.tensor(ref + 1e-3), ref, ref)
    assert not off["ok"] and off["grad_err"] == pytest.approx(5e-4, rel=1e-3)


def test_parity_on_cpu_tensors_with_the_accelerator_strategy(monkeypatch):
    """The script's torch parity grid (every option set × reduction × float32/bfloat16) on a small shape, and
    no host read in any of its calls."""
    from multixent import _compat

    monkeypatch.setattr(_compat, "ACCELERATOR_ON_CPU", True)
    monkeypatch.setattr(_compat, "SYNC_CHECKS", False)  # (set by the environment: the device-side check here)
    results = gpu.parity_torch("cpu", (6, 11), compiled_cases=0)
    assert len(results) == 2 * len(gpu.CASES) * (3 + 2)  # "sum" and "mean" twice: autograd, cross_entropy_and_grad
    assert [r for r in results if not r["ok"]] == []
    assert [r for r in results if r["host_syncs"]] == []  # no .item(), .tolist(), .numpy() during any call


def test_dry_run_never_overwrites_the_recorded_report():
    with pytest.raises(SystemExit) as e:
        gpu.main(["--dry", "--out", str(gpu.DEFAULT_OUT)])
    assert e.value.code == 2


def test_profiler_events_of_a_call():
    """The launch count's profiler call works here (on the CPU it counts CPU events: the GPU counts kernels)."""
    assert gpu.device_events(lambda: torch.ones(3) * 2, cuda=False) >= 1
