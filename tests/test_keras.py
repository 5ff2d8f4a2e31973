"""``multixent.keras.CrossEntropy`` in ``model.compile(...).fit(...)`` on the JAX and torch Keras backends.

Each Keras backend runs in its own process (``KERAS_BACKEND`` is read when keras is first
imported), which fits every case of ``CASES``; a backend runs when its framework is selected
(``MULTIXENT_BACKENDS``) and keras is installed. Each fit's losses must equal those of the same
model, from the same weights, fitted with Keras's own loss.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SELECTED

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    {"sparse": True, "sample_weight": False, "reduction": "sum_over_batch_size"},
    {"sparse": True, "sample_weight": True, "reduction": "sum"},
    {"sparse": False, "sample_weight": True, "reduction": "sum_over_batch_size"},
    {"sparse": False, "sample_weight": False, "reduction": "mean_with_sample_weight"},
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras
    from multixent.keras import CrossEntropy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    labels = rng.integers(0, 3, size=(32, 1))  # Keras's (N, 1) integer labels
    weights = rng.uniform(0.5, 2.0, size=32).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    start = model.get_weights()
    results = []
    for case in json.loads(sys.argv[1]):
        if case["sparse"]:
            y = labels
            native = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=case["reduction"])
        else:
            y = np.eye(3, dtype="float32")[labels[:, 0]]
            native = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=case["reduction"])
        ours = CrossEntropy(sparse=case["sparse"], reduction=case["reduction"])
        ours = CrossEntropy.from_config(json.loads(json.dumps(ours.get_config())))  # serialisable
        losses = []
        for loss in (ours, native):
            model.set_weights(start)
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
            sample_weight = weights if case["sample_weight"] else None
            fit = model.fit(x, y, sample_weight=sample_weight, batch_size=8, epochs=2, shuffle=False, verbose=0)
            losses.append(fit.history["loss"])
        results.append({"ours": losses[0], "native": losses[1]})
    print(json.dumps({"backend": keras.backend.backend(), "results": results}))
    """
)


@functools.cache
def _fit_all(keras_backend: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(f"{k}={v}" for k, v in CASES[i].items()))
@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_fit_matches_keras_loss(keras_backend, case):
    if keras_backend not in SELECTED:
        pytest.skip(f"backend {keras_backend} not selected (MULTIXENT_BACKENDS)")
    for module in ("keras", keras_backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    out = _fit_all(keras_backend)
    assert out["backend"] == keras_backend
    got = out["results"][case]
    assert got["ours"] == pytest.approx(got["native"], rel=1e-5), got
