"""Run a test function on N torch.distributed ranks (gloo, 127.0.0.1), each in its own process.

``run_ranks(fn, world_size=2, timeout=120, args=())`` starts ``world_size`` fresh Python processes;
each joins one gloo process group and calls ``fn(rank, world_size, *args)``. It returns the ranks'
return values (a list, by rank; they must pickle). ``fn`` must be a module-level function of an
importable module (a test module is: the children get the parent's ``sys.path``).

- A rank that raises fails the call with an ``AssertionError`` holding that rank's traceback
  (every failed rank's, if several), and the other ranks are killed at once: a rank left waiting
  in a collective its failed peer never reaches does not hold the test up.
- A hang (every rank alive past ``timeout`` seconds) fails with ``TimeoutError`` naming the ranks
  still running and their output so far.
- Either way no process is left behind: each rank runs in its own session and is killed with its
  whole process group.

The rendezvous needs no guessed port: the parent opens a ``TCPStore`` on 127.0.0.1 port 0 (the
kernel picks a free one) and the ranks join it as clients. Each rank uses one torch thread
(``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``). Callers skip when torch is absent
(``pytest.importorskip("torch")``); this module imports torch only inside ``run_ranks``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"

#: The multi-process tests run in ``nox -s distributed`` only (it sets ``MULTIXENT_DISTRIBUTED=1``),
#: not again in the per-backend sessions: ``pytestmark = ONLY_DISTRIBUTED`` in their modules.
ONLY_DISTRIBUTED = pytest.mark.skipif(
    os.environ.get("MULTIXENT_DISTRIBUTED") != "1",
    reason="multi-process runs: nox -s distributed, or MULTIXENT_DISTRIBUTED=1",
)


def outcomes(cases: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """Each case's outcome on this rank: ``"none"`` or ``"Type: message"`` of the error it raised."""
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = "none"
        except Exception as err:  # reported to the parent
            out[name] = f"{type(err).__name__}: {err}"
    return out


def run_ranks(fn: Callable[..., Any], world_size: int = 2, timeout: float = 120.0, args: tuple = ()) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each on its own gloo rank."""
    import torch.distributed as dist

    module, name = fn.__module__, fn.__qualname__
    if module == "__main__" or "<locals>" in name:
        raise ValueError(f"run_ranks: fn must be a module-level function of an importable module, got {module}.{name}")
    store = dist.TCPStore(HOST, 0, world_size=None, is_master=True, timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="multixent-ranks-") as tmp:
        procs, logs = [], []
        try:
            for rank in range(world_size):
                spec = Path(tmp, f"spec{rank}.pkl")
                spec.write_bytes(
                    pickle.dumps(
                        {
                            "sys_path": sys.path,
                            "module": module,
                            "name": name,
                            "args": args,
                            "rank": rank,
                            "world_size": world_size,
                            "port": store.port,
                            "timeout": timeout,
                            "result": str(Path(tmp, f"result{rank}.pkl")),
                        }
                    )
                )
                log = open(Path(tmp, f"log{rank}.txt"), "w+b")  # noqa: SIM115 - closed in finally
                logs.append(log)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, str(spec)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,  # its own process group: killed with its children
                    )
                )
            _wait(procs, logs, timeout)
            return [_result(Path(tmp, f"result{rank}.pkl"), rank, logs[rank]) for rank in range(world_size)]
        finally:
            _kill(procs)
            for log in logs:
                log.close()
            del store


def _wait(procs: list[subprocess.Popen], logs: list, timeout: float) -> None:
    """Until every rank exits 0; raise at the first failure, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            time.sleep(0.5)  # let a peer failing at the same moment finish writing its traceback
            _kill(procs)
            reports = "\n".join(f"--- rank {r} (exit {procs[r].poll()}):\n{_output(logs[r])}" for r in failed)
            raise AssertionError(f"run_ranks: rank(s) {failed} of {len(procs)} failed\n{reports}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            _kill(procs)
            reports = "\n".join(f"--- rank {r}:\n{_output(logs[r])}" for r in running)
            raise TimeoutError(f"run_ranks: rank(s) {running} still running after {timeout:g} s, killed\n{reports}")
        time.sleep(0.05)


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each rank's process group (the rank and anything it started) and reap it."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _output(log: Any, limit: int = 20_000) -> str:
    log.flush()
    log.seek(0)
    text = log.read().decode(errors="replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _result(path: Path, rank: int, log: Any) -> Any:
    if not path.exists():
        raise AssertionError(f"run_ranks: rank {rank} exited 0 without a result\n{_output(log)}")
    return pickle.loads(path.read_bytes())


def _child(spec_path: str) -> None:
    """One rank: join the group, run the function, write its return value; exit 1 with the traceback on error."""
    spec = pickle.loads(Path(spec_path).read_bytes())
    sys.path[:] = spec["sys_path"]
    try:
        import importlib

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        timeout = timedelta(seconds=spec["timeout"])
        store = dist.TCPStore(HOST, spec["port"], is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=spec["rank"], world_size=spec["world_size"], timeout=timeout)
        fn = importlib.import_module(spec["module"])
        for part in spec["name"].split("."):
            fn = getattr(fn, part)
        result = fn(spec["rank"], spec["world_size"], *spec["args"])
        Path(spec["result"]).write_bytes(pickle.dumps(result))
    except BaseException:
        sys.stdout.flush()
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        os._exit(1)  # no atexit/destructor that could wait on a peer
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip destroy_process_group's wait for peers: the parent collects every rank's exit


if __name__ == "__main__":
    _child(sys.argv[1])
