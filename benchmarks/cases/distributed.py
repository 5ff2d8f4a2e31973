"""Vocabulary parallelism on 2 gloo processes (issue 11, item 7): torch DTensor logits sharded on the class axis.

``TorchVocabParallel``: N=4096, C=32000 fp32 logits as a DTensor ``Shard(1)`` on a 1-D CPU mesh of 2
ranks (16000 classes each), a replicated target, forward+backward of the mean loss.
``impl="multixent"`` is ``multixent.cross_entropy(logits, target).backward()``;
``impl="loss_parallel"`` torch's own ``with loss_parallel(): F.cross_entropy(logits, target).backward()``
on the same DTensor (the baseline, only here). ``TorchLinearVocabParallel``:
``multixent.linear_cross_entropy`` with the classifier split by vocabulary rows over the 2 ranks
(``group=``), N=8192, D=512, V=32768, hidden replicated.

Each ``track_`` starts 2 fresh rank processes (one torch thread each, a TCPStore on a free
127.0.0.1 port) and returns one number:

- ``track_time_per_rank``: seconds per forward+backward, the median of ``REPEAT`` calls after one
  warm-up, the slower rank's.
- ``track_peak_extra_memory``: the rank's peak RSS during one forward+backward beyond its RSS
  after the inputs exist (``VmHWM`` of ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` just before the call; the gradient left in ``.grad`` counts), divided by
  the rank's local logits' bytes (``N x C/2 x 4``); the larger rank's. Both in fresh processes.

The rank processes run this file as a script (``python distributed.py rank ...``): it imports
nothing of the benchmark package.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

if __package__:  # imported by asv (not as a rank's script)
    from ._common import LINEAR_D, LINEAR_N, TINY, skip
else:  # pragma: no cover - a rank process
    TINY = os.environ.get("MULTIXENT_BENCH_GRID") == "tiny"
    LINEAR_N, LINEAR_D = (512, 64) if TINY else (8192, 512)

WORLD = 2
N, C = (256, 1000) if TINY else (4096, 32000)
LINEAR_V = 2048 if TINY else 32768
REPEAT = 5
HOST = "127.0.0.1"


def run(case: str, impl: str, measure: str, timeout: float = 600.0) -> list[float]:
    """Start the ranks, wait for them, return each rank's number (raises with their output on failure)."""
    import torch.distributed as dist

    store = dist.TCPStore(HOST, 0, world_size=None, is_master=True, timeout=timedelta(seconds=timeout))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    args = [sys.executable, os.path.abspath(__file__), case, impl, measure, str(store.port)]
    procs = [
        subprocess.Popen([*args, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for rank in range(WORLD)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(f"rank {r}: {err}" for r, (_, err) in enumerate(outs)))
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def _status(field: str) -> int:
    """``VmHWM``/``VmRSS`` of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _rank_main(case: str, impl: str, measure: str, port: int, rank: int) -> float:
    """One rank: build its inputs, then time or measure forward+backward."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    import multixent

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(rank)
    target = torch.randint(0, C if case == "ce" else LINEAR_V, (N if case == "ce" else LINEAR_N,), generator=g)
    dist.broadcast(target, 0)  # replicated

    if case == "ce":
        local = torch.empty(N, C // WORLD).normal_(0.0, 2.0, generator=g).requires_grad_()
        local_bytes = local.numel() * 4
        t_dt = DTensor.from_local(target, mesh, [Replicate()], run_check=False)

        def step() -> None:
            x = DTensor.from_local(local, mesh, [Shard(1)], run_check=False)
            if impl == "loss_parallel":
                with loss_parallel():
                    F.cross_entropy(x, t_dt).backward()
            else:
                multixent.cross_entropy(x, t_dt).backward()

    else:  # linear: the classifier split by vocabulary rows
        v_local = LINEAR_V // WORLD
        hidden = torch.empty(LINEAR_N, LINEAR_D).normal_(generator=torch.Generator().manual_seed(0))
        hidden.requires_grad_()
        w = torch.empty(v_local, LINEAR_D).normal_(0.0, LINEAR_D**-0.5, generator=g).requires_grad_()
        local_bytes = LINEAR_N * v_local * 4

        def step() -> None:
            multixent.linear_cross_entropy(hidden, w, target, group=dist.group.WORLD).backward()

    def clear() -> None:
        for p in (local,) if case == "ce" else (hidden, w):
            p.grad = None

    if measure == "memory":
        dist.barrier()
        rss = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        return (_status("VmHWM") - rss) / local_bytes
    times = []
    for _ in range(REPEAT + 1):
        clear()
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


class _Ranks:
    timeout = 900
    number = 1
    repeat = 1
    warmup_time = 0.0


class TorchVocabParallel(_Ranks):
    """N=4096, C=32000 fp32 DTensor ``Shard(1)`` on 2 ranks, forward+backward: multixent and ``loss_parallel()``."""

    params = (["multixent", "loss_parallel"],)
    param_names = ("impl",)

    def track_time_per_rank(self, impl: str) -> float:
        return max(run("ce", impl, "time"))

    track_time_per_rank.unit = "seconds"  # type: ignore[attr-defined]

    def track_peak_extra_memory(self, impl: str) -> float:
        return max(run("ce", impl, "memory"))

    track_peak_extra_memory.unit = "x local logits"  # type: ignore[attr-defined]


class TorchLinearVocabParallel(_Ranks):
    """``linear_cross_entropy``, classifier split over 2 ranks, N=8192, D=512, V=32768: memory ÷ local logits."""

    params = (["multixent"],)
    param_names = ("impl",)

    def setup(self, impl: str) -> None:
        import inspect

        import multixent

        if "group" not in inspect.signature(multixent.linear_cross_entropy).parameters:
            skip("linear_cross_entropy has no group= keyword yet")

    def track_peak_extra_memory(self, impl: str) -> float:
        return max(run("linear", impl, "memory"))

    track_peak_extra_memory.unit = "x local logits"  # type: ignore[attr-defined]


if __name__ == "__main__":
    case, impl, measure, port, rank = sys.argv[1:]
    print(json.dumps(_rank_main(case, impl, measure, int(port), int(rank))))
