"""dask arrays (issue 11, item 5): lazy results equal to NumPy's, and an out-of-core run.

The small tests run wherever dask is installed. The out-of-core run (a
``dask.distributed`` ``LocalCluster`` of 2 worker processes capped at
512 MiB, over 2 GiB of lazily generated float64 logits) runs only when
``MULTIXENT_DISTRIBUTED`` is set, as ``nox -s distributed`` does.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import multixent as mx  # noqa: E402

ROWS, CLASSES = 24, 10
#: chunked over rows, over classes, over both
CHUNKS = {"rows": (5, CLASSES), "classes": (ROWS, 3), "both": (7, 4)}


def _forbid_compute(*args, **kwargs):
    raise AssertionError("multixent computed a dask array while building the graph")


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, CLASSES, ROWS)
    target[::4] = -100
    probs = rng.random((ROWS, CLASSES))
    x = 3 * rng.standard_normal((ROWS, CLASSES))
    return {"x": x, "index": target, "probs": probs / probs.sum(-1, keepdims=True), "weight": rng.random(CLASSES)}


CALLS = {
    "cross_entropy": (mx.cross_entropy, "index", {}),
    "cross_entropy-options": (
        mx.cross_entropy,
        "index",
        {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
    ),
    "cross_entropy-none": (mx.cross_entropy, "index", {"reduction": "none", "weight": True}),
    "cross_entropy-probs": (mx.cross_entropy, "probs", {"label_smoothing": 0.2, "reduction": "sum"}),
    "cross_entropy_and_grad": (mx.cross_entropy_and_grad, "index", {"weight": True, "label_smoothing": 0.1}),
    "cross_entropy_and_grad-sum": (mx.cross_entropy_and_grad, "index", {"reduction": "sum", "z_loss": 1e-3}),
    "nll_loss": (mx.nll_loss, "index", {"weight": True}),
    "nll_loss-none": (mx.nll_loss, "index", {"reduction": "none"}),
    "log_softmax": (mx.log_softmax, None, {}),
    "logsumexp": (mx.logsumexp, None, {"keepdims": True}),
}


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("call", list(CALLS))
def test_lazy_and_equal_to_numpy(call: str, chunks: str) -> None:
    f, target_kind, opts = CALLS[call]
    data = _data()
    rows, cols = CHUNKS[chunks]

    def args(lazy: bool):
        wrap = (lambda a, c: da.from_array(a, chunks=c)) if lazy else (lambda a, c: a)
        out = [wrap(data["x"], (rows, cols))]
        if target_kind == "index":
            out.append(wrap(data["index"], (rows,)))
        elif target_kind == "probs":
            out.append(wrap(data["probs"], (rows, cols)))
        kw = dict(opts)
        if kw.pop("weight", False):
            kw["weight"] = wrap(data["weight"], (cols,))
        return out, kw

    with dask.config.set(scheduler=_forbid_compute):
        result = f(*args(True)[0], **args(True)[1])
    expected = f(*args(False)[0], **args(False)[1])
    results = result if isinstance(result, tuple) else (result,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for r, e in zip(results, expected, strict=True):
        assert isinstance(r, da.Array), type(r)
        np.testing.assert_allclose(r.compute(scheduler="synchronous"), e, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# Out of core, under dask.distributed

GiB, MiB = 2**30, 2**20
OOC_CLASSES = 4096
OOC_CHUNK_ROWS = 32 * MiB // (8 * OOC_CLASSES)  # 1024 rows: 32 MiB of float64 per chunk
OOC_CHUNKS = 2 * GiB // (32 * MiB)  # 64 chunks: 2 GiB of logits
IGNORE_EVERY = 7


def _chunk(seed: int, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``i``'s logits and targets: the same numbers in the dask graph and in the reference."""
    rng = np.random.default_rng([seed, i])
    x = rng.standard_normal((OOC_CHUNK_ROWS, OOC_CLASSES))
    y = rng.integers(0, OOC_CLASSES, OOC_CHUNK_ROWS)
    y[::IGNORE_EVERY] = -100
    return x, y


def _lazy_logits(seed: int):
    rows = OOC_CHUNK_ROWS * OOC_CHUNKS
    x = da.map_blocks(
        lambda block_info=None: _chunk(seed, block_info[None]["chunk-location"][0])[0],
        chunks=((OOC_CHUNK_ROWS,) * OOC_CHUNKS, (OOC_CLASSES,)),
        dtype=np.float64,
    )
    y = da.map_blocks(
        lambda block_info=None: _chunk(seed, block_info[None]["chunk-location"][0])[1],
        chunks=((OOC_CHUNK_ROWS,) * OOC_CHUNKS,),
        dtype=np.int64,
    )
    assert x.shape == (rows, OOC_CLASSES) and x.nbytes == 2 * GiB
    return x, y


def _reference(seed: int, label_smoothing: float) -> float:
    """The float64 "mean" loss, chunk by chunk with NumPy: one chunk in memory at a time."""
    total, count = 0.0, 0
    for i in range(OOC_CHUNKS):
        x, y = _chunk(seed, i)
        x, y = x[y != -100], y[y != -100]
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        x_y = x[np.arange(len(y)), y]
        ce = (1 - label_smoothing) * (lse - x_y) + label_smoothing * (lse - x.mean(axis=1))
        total += float(ce.sum())
        count += len(y)
    return total / count


def _worker_state(dask_worker) -> dict:
    metrics = dask_worker.data.cumulative_metrics
    return {
        "pid": os.getpid(),
        "spilled_count": metrics.get(("disk-write", "count"), 0.0),
        "spilled_now": dask_worker.data.spilled_total.disk,
        "memory_limit": dask_worker.memory_manager.memory_limit,
    }


@pytest.mark.skipif(not os.environ.get("MULTIXENT_DISTRIBUTED"), reason="the out-of-core run: nox -s distributed")
def test_out_of_core_local_cluster() -> None:
    """2 GiB of logits on 2 workers capped at 512 MiB: completes, no restart, no spill, exact value."""
    distributed = pytest.importorskip("distributed")
    seed, smoothing = 11, 0.1
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, memory_limit="512MiB", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        before = client.run(_worker_state)
        start = time.perf_counter()
        x, y = _lazy_logits(seed)
        loss = mx.cross_entropy(x, y, label_smoothing=smoothing)
        assert isinstance(loss, da.Array)
        value = float(loss.compute())
        elapsed = time.perf_counter() - start
        after = client.run(_worker_state)
        print(f"\nout of core: 2 GiB float64 logits, 2 workers x 512 MiB: {elapsed:.1f} s; workers {after}")
    assert sorted(s["pid"] for s in after.values()) == sorted(s["pid"] for s in before.values()), "a worker restarted"
    assert all(s["memory_limit"] == 512 * MiB for s in after.values())
    assert all(s["spilled_count"] == 0 and s["spilled_now"] == 0 for s in after.values()), after
    expected = _reference(seed, smoothing)
    assert abs(value - expected) <= 1e-12 * abs(expected), (value, expected)


# --------------------------------------------------------------------------
# Floating-point warnings at compute time; unknown chunk sizes


def _args(call: str, data: dict, chunks: str, lazy: bool, rows=None) -> tuple[list, dict]:
    """``CALLS[call]``'s arguments from ``data``: dask arrays of ``CHUNKS[chunks]`` when ``lazy``, their rows
    ``rows`` (a boolean mask: lazy, a dask array, for dask arrays) when given."""
    _, target_kind, opts = CALLS[call]
    r, c = CHUNKS[chunks]

    def wrap(a, chunks, select=True):
        a = da.from_array(a, chunks=chunks) if lazy else a
        return a if rows is None or not select else a[da.from_array(rows, chunks=r) if lazy else rows]

    out = [wrap(data["x"], (r, c))]
    if target_kind == "index":
        out.append(wrap(data["index"], (r,)))
    elif target_kind == "probs":
        out.append(wrap(data["probs"], (r, c)))
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = wrap(data["weight"], (c,), select=False)
    return out, kw


def _extreme_data() -> dict[str, np.ndarray]:
    """``_data()`` with infinite logits: +inf in a row, a row of -inf, -inf at a target, ignored rows holding inf."""
    data = _data(1)
    x = data["x"]
    x[1, 3] = np.inf
    x[2, :] = -np.inf
    x[3, data["index"][3]] = -np.inf
    x[4, :2] = np.inf  # an ignored row (every 4th)
    x[8, 5] = -np.inf
    return data


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("call", list(CALLS))
def test_no_floating_point_warning_at_compute(call: str, chunks: str, scheduler: str) -> None:
    """NumPy's errstate covers the call; the graph's tasks run under it too, wherever dask computes them.
    The values equal the NumPy call's (NaN where it gives NaN)."""
    f = CALLS[call][0]
    data = _extreme_data()
    args, kw = _args(call, data, chunks, lazy=True)
    result = f(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = f(*_args(call, data, chunks, lazy=False)[0], **_args(call, data, chunks, lazy=False)[1])
        results = result if isinstance(result, tuple) else (result,)
        computed = dask.compute(*results, scheduler=scheduler)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for got, e in zip(computed, expected, strict=True):
        np.testing.assert_allclose(got, e, rtol=1e-12, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("call", list(CALLS))
def test_unknown_chunk_sizes(call: str, chunks: str) -> None:
    """Rows selected by a lazy mask (``x[mask]``: sizes NaN until computed) fit their target; the values
    equal the NumPy call on the selected rows."""
    f = CALLS[call][0]
    data = _data(2)
    rows = data["x"][:, 0] > -1.0
    assert 0 < rows.sum() < ROWS
    args, kw = _args(call, data, chunks, lazy=True, rows=rows)
    assert np.isnan(args[0].shape[0])
    with dask.config.set(scheduler=_forbid_compute):
        result = f(*args, **kw)
    plain_args, plain_kw = _args(call, data, chunks, lazy=False, rows=rows)
    expected = f(*plain_args, **plain_kw)
    results = result if isinstance(result, tuple) else (result,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for r, e in zip(results, expected, strict=True):
        assert isinstance(r, da.Array), type(r)
        np.testing.assert_allclose(r.compute(scheduler="synchronous"), e, rtol=1e-12, atol=1e-14)
