"""The multi-process harness (:mod:`_ranks`): results come back by rank, a rank's error fails the test
with its traceback, and a hang fails within the timeout with no process left behind."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("torch")

from _ranks import ONLY_DISTRIBUTED, run_ranks

pytestmark = ONLY_DISTRIBUTED


def _all_reduce_rank(rank: int, world_size: int, scale: float) -> tuple[int, float, int]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, scale * t.item(), torch.get_num_threads()


def test_results_by_rank() -> None:
    """Each rank's return value, in rank order; the all-reduce really spans the ranks; one thread each."""
    assert run_ranks(_all_reduce_rank, 2, args=(10.0,)) == [(0, 30.0, 1), (1, 30.0, 1)]


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank one refuses")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes


def test_a_rank_raising_fails_with_its_traceback() -> None:
    start = time.monotonic()
    # rank 0 may also be listed: its all-reduce can fail ("connection closed") before it is killed
    with pytest.raises(AssertionError, match=r"(?s)rank\(s\) \[(0, )?1\].*ValueError: rank one refuses") as info:
        run_ranks(_raise_on_rank_1, 2, timeout=60)
    assert "_raise_on_rank_1" in str(info.value)  # the traceback names the function
    assert time.monotonic() - start < 30  # not held up by rank 0 waiting in the all-reduce


def _hang_and_report_pid(rank: int, world_size: int, pid_dir: str) -> None:
    import torch
    import torch.distributed as dist

    with open(os.path.join(pid_dir, f"{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    time.sleep(3600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: /proc/PID/stat's third field is its state
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_hang_fails_within_the_timeout_and_leaves_no_process(tmp_path) -> None:
    # the timeout counts from the spawn: long enough for both ranks to import torch on a busy machine
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] still running after 40 s"):
        run_ranks(_hang_and_report_pid, 2, timeout=40, args=(str(tmp_path),))
    assert time.monotonic() - start < 40 + 10
    pids = [int((tmp_path / f"{rank}").read_text()) for rank in range(2)]
    assert not [pid for pid in pids if _alive(pid)]


def _local_function_is_refused() -> None:
    def inner(rank: int, world_size: int) -> None: ...

    run_ranks(inner, 2)


def test_fn_must_be_importable() -> None:
    with pytest.raises(ValueError, match="module-level function"):
        _local_function_is_refused()
