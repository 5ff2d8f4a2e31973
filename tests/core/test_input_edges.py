"""Inputs at the edges of what the paths took: a 0-d tensor ``softcap`` or ``label_smoothing`` under
``torch.compile(fullgraph=True)``, and a ``shard_map`` class axis split over mesh axes the group
does not name (its error names the axis the group misses).

The dask cases (warnings at ``.compute()``, unknown chunk sizes) are in ``test_dask.py``, the Keras
ones (one-hot labels with ``sparse=True``, ignored labels and the denominator) in ``test_keras.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _paths import ROOT

import multixent as mx

X = np.random.default_rng(7).normal(size=(6, 5)) * 3
Y = np.array([0, 4, -100, 2, 1, 3])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["softcap", "label_smoothing"])
def test_torch_compile_fullgraph_tensor_option(torch_backend, option, reduction):
    """Value and gradients (logits and option) equal F.cross_entropy's, softcap as ``s·tanh(x/s)`` first."""
    torch = torch_backend.modules["torch"]
    F = torch.nn.functional
    value = 3.0 if option == "softcap" else 0.1

    y = torch.as_tensor(Y)

    def native(x, v):
        if option == "softcap":
            return F.cross_entropy(v * torch.tanh(x / v), y, reduction=reduction)
        # F.cross_entropy takes a float label_smoothing only: (1-ε)·ce + ε·(the uniform target's ce), counted rows
        counted = (y != -100).to(x.dtype)
        uniform = F.cross_entropy(x, torch.full_like(x, 1 / x.shape[1]), reduction="none") * counted
        per_row = (1 - v) * F.cross_entropy(x, y, reduction="none") + v * uniform
        return {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / counted.sum()}[reduction]

    if option == "label_smoothing":  # the oracle's value is F.cross_entropy's with the float
        expected = F.cross_entropy(torch.tensor(X), y, reduction=reduction, label_smoothing=value)
        np.testing.assert_allclose(native(torch.tensor(X), value).numpy(), expected.numpy(), rtol=1e-12)

    results = []
    compiled = torch.compile(lambda x, v: mx.cross_entropy(x, y, reduction=reduction, **{option: v}), fullgraph=True)
    for fn in (compiled, native):
        x = torch.tensor(X, requires_grad=True)
        v = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        out = fn(x, v)
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), (x, v))
        results.append([out.detach().numpy(), *(g.numpy() for g in grads)])
    for got, expected in zip(*results, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P
    import multixent as mx

    jax.config.update("jax_enable_x64", True)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 12)))
    t = jnp.asarray([0, 2, 3, 5, 6, 8, 9, 11, -100, 4])
    # the class axis split over ("a", "b"), the group naming "a" only
    h, w = jnp.asarray(np.random.default_rng(1).normal(size=(10, 4))), jnp.ones((12, 4))
    for fn, arg, spec in (
        (lambda a: mx.cross_entropy(a, t, group="a"), x, P(None, ("a", "b"))),
        (lambda a: mx.linear_cross_entropy(h, a, t, group="a"), w, P(("a", "b"), None)),
    ):
        try:
            jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=P())(arg)
            print("no error")
        except IndexError as err:
            print("IndexError:", err)
    # the batch split over "b", the classes over "a": the same values as the unsharded call
    per_row = jax.shard_map(
        lambda a, tt: mx.cross_entropy(a, tt, group="a", reduction="none"),
        mesh=mesh, in_specs=(P("b", "a"), P("b")), out_specs=P("b"),
    )(x, t)
    print("batch over b:", bool(np.allclose(per_row, mx.cross_entropy(x, t, reduction="none"), rtol=1e-12)))
    """
)


def test_shard_map_class_axis_split_beyond_the_group(jax_backend):
    """The concrete target's IndexError names the mesh axis the logits (or classifier) also vary over and the
    group to pass; a batch split over that axis still works. On 4 simulated devices, in its own process."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
    }
    result = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    for line in lines[:2]:
        assert line.startswith("IndexError: multixent: target holds class index 6"), line
        assert "3 local classes x 2 members of group='a'" in line, line
        assert "also varies over mesh axis 'b', which the group does not name" in line, line
        assert "group=('a', 'b')" in line, line
    assert lines[2] == "batch over b: True"
