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

import numpy as np
import pytest
from _paths import ROOT
from conftest import SELECTED

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


# --------------------------------------------------------------------------
# Ignored labels (-100) and one-hot labels with sparse=True

REDUCTIONS = ["sum_over_batch_size", "sum", "mean_with_sample_weight", None]

EDGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras
    from multixent.keras import CrossEntropy

    data = json.loads(sys.argv[1])
    logits, labels = np.asarray(data["logits"], "float32"), np.asarray(data["labels"])
    weights = np.asarray(data["weights"], "float32")
    values = {}
    for reduction in data["reductions"]:
        for weighted in (False, True):
            loss = CrossEntropy(reduction=reduction)
            out = loss(labels[:, None].astype("float32"), logits, sample_weight=weights if weighted else None)
            values[f"{reduction}-{weighted}"] = np.asarray(keras.ops.convert_to_numpy(out), "float64").tolist()
    try:
        CrossEntropy()(np.eye(logits.shape[1], dtype="float32")[np.maximum(labels, 0)], logits)
        one_hot = "no error"
    except ValueError as err:
        one_hot = str(err)
    # fitted with -100 labels, against Keras's own loss ignoring them
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, size=(32, 1))
    y[::3] = -100
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    start = model.get_weights()
    fits = []
    for loss in (CrossEntropy(), keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)):
        model.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        fits.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history["loss"])
    print(json.dumps({"backend": keras.backend.backend(), "values": values, "one_hot": one_hot, "fits": fits}))
    """
)


def _edge_data() -> dict:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=12)
    labels[[1, 4, 5, 9]] = -100
    return {
        "logits": (rng.normal(size=(12, 5)) * 2).astype(np.float32).tolist(),
        "labels": labels.tolist(),
        "weights": rng.uniform(0.5, 2.0, size=12).astype(np.float32).tolist(),
        "reductions": REDUCTIONS,
    }


@functools.cache
def _edge_cases(keras_backend: str) -> dict:
    for module in ("keras", keras_backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", EDGE_SCRIPT, json.dumps(_edge_data())],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["backend"] == keras_backend
    return out


def _expected(reduction: str | None, weighted: bool) -> np.ndarray:
    """Keras's reductions with the ignored rows masked out, in float64: they count in no denominator."""
    data = _edge_data()
    x, y = np.asarray(data["logits"], np.float64), np.asarray(data["labels"])
    valid = y != -100
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    per_row = np.where(valid, lse - x[np.arange(len(y)), np.where(valid, y, 0)], 0.0)
    w = np.asarray(data["weights"], np.float64) if weighted else np.ones(len(y))
    weighted_rows = per_row * w * valid
    if reduction is None:
        return weighted_rows
    if reduction == "sum":
        return np.asarray(weighted_rows.sum())
    if reduction == "sum_over_batch_size":
        return np.asarray(weighted_rows.sum() / valid.sum())
    return np.asarray(weighted_rows.sum() / (w * valid).sum())


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_ignored_labels_count_in_no_denominator(keras_backend, reduction, weighted):
    if keras_backend not in SELECTED:
        pytest.skip(f"backend {keras_backend} not selected (MULTIXENT_BACKENDS)")
    got = np.asarray(_edge_cases(keras_backend)["values"][f"{reduction}-{weighted}"])
    np.testing.assert_allclose(got, _expected(reduction, weighted), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_ignored_labels_fit_as_keras_ignore_class(keras_backend):
    """Fitted with -100 labels, the losses equal Keras's SparseCategoricalCrossentropy(ignore_class=-100)'s."""
    if keras_backend not in SELECTED:
        pytest.skip(f"backend {keras_backend} not selected (MULTIXENT_BACKENDS)")
    ours, native = _edge_cases(keras_backend)["fits"]
    assert ours == pytest.approx(native, rel=1e-5)


@pytest.mark.parametrize("keras_backend", ["jax", "torch"])
def test_one_hot_labels_with_sparse_true_name_sparse_false(keras_backend):
    if keras_backend not in SELECTED:
        pytest.skip(f"backend {keras_backend} not selected (MULTIXENT_BACKENDS)")
    message = _edge_cases(keras_backend)["one_hot"]
    assert message.startswith("multixent.keras.CrossEntropy(sparse=True) takes class indices, y_true of shape (12,)")
    assert "got y_true of shape (12, 5), like y_pred's (12, 5)" in message
    assert message.endswith("Use CrossEntropy(sparse=False)")
