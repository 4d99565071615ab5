"""Start N processes on this machine joined by torch.distributed (gloo, loopback), run a function
on each and collect what each returns, or stop them all with one line when one fails.

Two ways in:

- `launch(fn, N)` starts the N processes itself (torch.multiprocessing), for `kvshrink generate
  --nproc N`, the bench and the tests. They are forks of one server process that imported fn's module
  (torch, transformers, the model code) once: started fresh, N ranks would each import them, seconds
  apiece and N at once on the same cores. Each rank gets the caller's environment as it is at the call,
  not as it was when the server started. A rank that raises makes the others stop at once (they would otherwise
  wait in a collective for it): the parent terminates them and raises `KvshrinkError` naming the
  rank that failed first. A run that outlives `timeout` seconds is stopped the same way, and so is a
  collective that waits that long (gloo's own timeout), so nothing hangs.
- `join(fn)` runs this process as one rank of a job another launcher started (`torchrun`, on one
  machine or several: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment). Rank 0
  gets every rank's result. A rank that fails marks itself in the job's store before it leaves its
  peers, so the rank that failed first is named; the launcher stops the rest.

`KVSHRINK_FAULT_RANK=r` makes rank r raise before its first collective (fault injection: the
tests check that the others stop).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import KvshrinkError

FAULT = "KVSHRINK_FAULT_RANK"
GRACE = 2.0  # seconds the other ranks get to stop by themselves once one has failed
logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # its "Terminating process" warnings: we say it in one line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, timeout: float, out: str, args: tuple, env: dict) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's from its start
    os.environ.update(env)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    try:
        if os.environ.get(FAULT) == str(rank):
            raise KvshrinkError(f"fault injected on rank {rank} ({FAULT})")
        torch.save(fn(rank, world, *args), os.path.join(out, f"{rank}.pt"))
    except Exception as e:
        # written before this rank lets go of its peers: the first such file names the cause, where the
        # others then fail only because it left their collectives
        with open(os.path.join(out, f"{rank}.err"), "w") as fh:
            fh.write(f"{type(e).__name__}: {e}" if not isinstance(e, KvshrinkError) else str(e))
        raise
    finally:
        dist.destroy_process_group()


def torchrun_env() -> bool:
    """Whether this process was started as a rank of a distributed job (torchrun sets these)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _mark_failed(store, rank: int, message: str) -> tuple[int, str]:
    """Record this rank's failure in the job's store; (rank, message) of the first one recorded."""
    try:
        if store.add("kvshrink/failed", 1) == 1:
            store.set("kvshrink/first", f"{rank}\n{message}")
        first, line = store.get("kvshrink/first").decode().split("\n", 1)
        return int(first), line
    except Exception:  # the store went with a peer: say what this rank knows
        return rank, message


def join(fn, args: tuple = (), first=None, timeout: float = 600.0) -> list | None:
    """fn(rank, world, *args) as this process's rank of a job started by torchrun (`torchrun_env()`).
    `first` = (check, check_args): run on rank 0 before any rank starts fn (a calibration made once,
    input that every rank would refuse refused once: rank 0 raises it, the others raise
    `KvshrinkError("")`, which the CLI turns into exit code 2 without a second line).
    Returns every rank's result on rank 0, None on the others."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    store = dist.distributed_c10d._get_default_store()
    try:
        if first is not None:
            said = [None]
            if rank == 0:
                try:
                    first[0](*first[1])
                except KvshrinkError as e:
                    said = [str(e)]
            dist.broadcast_object_list(said, src=0)
            if said[0] is not None:
                raise KvshrinkError(said[0] if rank == 0 else "")
        try:
            if os.environ.get(FAULT) == str(rank):
                raise KvshrinkError(f"fault injected on rank {rank} ({FAULT})")
            result = fn(rank, world, *args)
            got = [None] * world if rank == 0 else None
            dist.gather_object(result, got, dst=0)
        except Exception as e:
            said = str(e) if isinstance(e, KvshrinkError) else f"{type(e).__name__}: {e}"
            who, line = _mark_failed(store, rank, said)
            if who == rank:
                raise KvshrinkError(f"rank {rank} of {world} failed: {line}") from None
            raise KvshrinkError(f"rank {rank} of {world} stopped: rank {who} failed: {line}") from None
        return got
    finally:
        dist.destroy_process_group()


def _first_error(out: str) -> tuple[int, str] | None:
    """(rank, message) of the rank that failed first, from the files failing ranks write."""
    errs = [f for f in os.listdir(out) if f.endswith(".err")]
    if not errs:
        return None
    first = min(errs, key=lambda f: os.stat(os.path.join(out, f)).st_mtime_ns)
    with open(os.path.join(out, first)) as fh:
        return int(first.split(".")[0]), fh.read().strip().splitlines()[-1]


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    line = lines[-1] if lines else text
    return line.split("KvshrinkError: ", 1)[-1]


def _start_method(fn) -> str:
    """"forkserver" where the platform has it, its server importing fn's module once per process that
    launches; "spawn" elsewhere."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if fn.__module__ != "__main__":  # preloading "__main__" would run the caller's script in the server
        multiprocessing.get_context("forkserver").set_forkserver_preload([fn.__module__])  # no-op once it runs
    return "forkserver"


def launch(fn, nproc: int, args: tuple = (), timeout: float = 600.0) -> list:
    """[fn(rank, nproc, *args) for every rank], each run in its own process. fn must be a module-level
    function (it is pickled by name) and its result picklable."""
    if not isinstance(nproc, int) or nproc < 1:
        raise KvshrinkError(f"--nproc must be a positive integer, got {nproc!r}")
    with tempfile.TemporaryDirectory(prefix="kvshrink-sp-") as out:
        ctx = mp.start_processes(_entry, args=(fn, nproc, free_port(), timeout, out, args, dict(os.environ)),
                                 nprocs=nproc, join=False, start_method=_start_method(fn))
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5, grace_period=GRACE):
                if time.monotonic() > deadline:
                    raise KvshrinkError(f"the {nproc}-process run took longer than {timeout:.0f} s; stopped")
        except mp.ProcessRaisedException as e:
            rank, line = _first_error(out) or (e.error_index, _last_line(str(e)))
            raise KvshrinkError(f"rank {rank} of {nproc} failed: {line}") from None
        except mp.ProcessExitedException as e:
            raise KvshrinkError(f"rank {e.error_index} of {nproc} exited with code {e.exit_code}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(nproc)]
