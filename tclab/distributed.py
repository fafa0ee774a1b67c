"""Scale-out on torchrun: which process am I, which work is mine, finished shards on disk, launching workers.

tclab runs under the launcher the field already uses (``torchrun``, as the DiT repository's
``sample_ddp.py``)::

    torchrun --standalone --nproc_per_node=8 -m tclab sample --model DiT-XL-2-256 --num-samples 50000 --npz s.npz

Every process ("rank") reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) with :func:`init_world`; outside torchrun it is rank 0 of 1 and no process group is
made. The work is cut into **units** (a shard of samples; for sweeps a (variant, shard) pair). Where
the units are kept on disk, each rank claims the next free one when it is free
(:meth:`ShardFolder.claimed`), so uneven units and resumed runs balance themselves; otherwise they are
dealt round-robin (:func:`my_units`): unit ``u`` is rank ``u % world_size``'s. A unit's result
never depends on which rank ran it or how many ranks there are, because a unit is a whole number of
the batches one process would run and its noise is the whole run's (``tclab.sampling``): so results
are byte-identical at any world size.

**Shards on disk.** Each rank writes each finished unit as one file into a :class:`ShardFolder`,
atomically (a temporary name in the same folder, then ``os.replace``), next to a ``plan.json`` that
says what the units are. ``--resume`` skips the units whose file is there, after checking the plan
is the same; rank 0 merges only when every unit's file is there, so a run that lost a rank never
leaves a merged result that looks complete.

**A rank that dies** (killed, out of memory, an exception) makes torchrun stop the others and exit
non-zero. :func:`launch_workers` (``--workers N`` on the command line, ``workers`` in the notebooks)
starts torchrun on this machine with one log per rank and turns that into :class:`WorkerFailedError`,
which names the rank, how it ended and its log, and says that ``--resume`` continues.

Backends: gloo on CPU (each worker one thread: torchrun sets ``OMP_NUM_THREADS=1``), nccl on GPUs,
one device per local rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

# one atomic write for every file a rank leaves; re-exported here for the callers of tclab.distributed
from .files import write_atomic  # noqa: F401

#: How long a rank waits for the others at a barrier before giving up (a hung rank; torchrun stops
#: every rank at once when one dies, so a normal failure never waits this long).
BARRIER_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``world_size``, its ``local_rank`` on this machine,
    the ``device`` it computes on and the process group's ``backend`` (None when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """What a report states: world size, backend and the devices (gathered from every rank)."""
        return {"world_size": self.world_size, "backend": self.backend or "none (one process)",
                "devices": all_gather(self, _device_name(self.device))}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"


def init_world(device: str | None = None) -> World:
    """This process's :class:`World`, from torchrun's environment; joins the process group when there are
    several ranks (nccl when CUDA is there and ``device`` is not ``"cpu"``, else gloo). ``device``: None =
    ``cuda:<local rank>`` when CUDA is available, else ``cpu``."""
    import torch.distributed as dist

    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them): {e}") from None
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and local >= torch.cuda.device_count():
        raise ValueError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; start at most "
                         "that many workers per machine (torchrun --nproc_per_node, or workers)")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    backend = None
    if size > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return World(rank=rank, world_size=size, local_rank=local, device=device, backend=backend)


def close_world(world: World) -> None:
    import torch.distributed as dist

    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather(world: World, obj: Any) -> list:
    """``obj`` of every rank, in rank order (one element when alone)."""
    if world.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def my_units(num_units: int, world: World) -> list[int]:
    """The units of ``range(num_units)`` that are this rank's: round-robin, unit ``u`` to rank ``u % world_size``."""
    return list(range(world.rank, num_units, world.world_size))


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each shard of ``n`` items in shards of ``shard_size`` (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    return [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]


# ---- finished shards on disk ------------------------------------------------------------------------------

class ShardFolder:
    """A folder of finished units, ``unit-000012.pt``, beside the ``plan.json`` that says what they are.

    :meth:`start` writes the plan (rank 0) or checks an existing one (``resume``); :meth:`write` saves one
    unit atomically; :meth:`done` lists the finished units; :meth:`read` loads one; :meth:`missing`
    says which of the plan's units have no file (merge only when it is empty)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def unit_path(self, u: int) -> Path:
        return self.path / f"unit-{u:06d}.pt"

    def start(self, plan: dict, world: World, resume: bool) -> None:
        """Rank 0 creates the folder and its plan; with finished units there, only ``resume`` continues, and
        only the same plan. Every rank then waits for rank 0 (one barrier)."""
        error = None
        if world.is_main:
            error = self._start_main(plan, resume)
        errors = all_gather(world, error)
        barrier(world)
        if errors[0]:
            raise ValueError(errors[0])

    def _start_main(self, plan: dict, resume: bool) -> str | None:
        plan_file = self.path / "plan.json"
        if plan_file.is_file():
            old = json.loads(plan_file.read_text(encoding="utf-8"))
            done = len(self.done())
            if not resume:
                return (f"{self.path} holds {done} finished unit(s) of an earlier run that did not finish; pass "
                        "--resume to continue it, or delete the folder to start again")
            if old != json.loads(json.dumps(plan, default=str)):
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != json.loads(json.dumps(plan.get(k), default=str)))
                return (f"--resume: the run in {self.path} was started with other settings ({', '.join(diff)} "
                        "differ); resume with the same settings, or delete the folder to start again")
            for claim in self.path.glob("unit-*.claim"):   # the claims of the ranks that stopped: free again
                claim.unlink()
            return None
        if self.path.exists() and any(self.path.iterdir()):
            return f"{self.path} exists and is not a tclab shard folder (no plan.json); choose another output"
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(plan_file, lambda f: f.write(json.dumps(plan, indent=1, default=str).encode()))
        return None

    def done(self) -> set[int]:
        return {int(m.group(1)) for p in self.path.glob("unit-*.pt") if (m := re.fullmatch(r"unit-(\d+)\.pt", p.name))}

    def missing(self, num_units: int) -> list[int]:
        done = self.done()
        return [u for u in range(num_units) if u not in done]

    def claim_path(self, u: int) -> Path:
        return self.path / f"unit-{u:06d}.claim"

    def claimed(self, num_units: int, world: World):
        """The units this rank runs, one at a time: each not finished and not claimed by another rank when this
        one is free is claimed (a file made with ``O_EXCL``, atomic on a local or shared filesystem) and
        yielded; so fast ranks take more units, and a resumed run shares what is left whatever the world size.
        Results never depend on which rank ran a unit."""
        for u in range(num_units):
            if self.unit_path(u).exists():
                continue
            try:
                fd = os.open(self.claim_path(u), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(world.rank).encode())
            os.close(fd)
            yield u

    def write(self, u: int, payload: dict) -> Path:
        return write_atomic(self.unit_path(u), lambda f: torch.save(payload, f))

    def read(self, u: int) -> dict:
        return torch.load(self.unit_path(u), map_location="cpu", weights_only=False)

    def progress(self, desc: str = "shards") -> Callable[[], None]:
        """A callable that shows the folder's finished units against the plan's count on a progress bar (for
        :func:`launch_workers`'s ``on_poll``: the launching process watches the workers' files)."""
        from .progress import progress_bar

        state: dict = {}

        def poll() -> None:
            plan = self.path / "plan.json"
            if "bar" not in state:
                if not plan.is_file():
                    return
                total = json.loads(plan.read_text(encoding="utf-8")).get("units")
                state["bar"] = progress_bar(total=total, desc=desc, unit="unit")
            bar = state["bar"]
            bar.n = len(self.done()) if self.path.is_dir() else bar.total
            bar.refresh()
            if bar.total is not None and bar.n >= bar.total:
                bar.close()

        return poll

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---- launching workers on this machine --------------------------------------------------------------------

class WorkerFailedError(RuntimeError):
    """A torchrun worker died: ``rank`` (None when torchrun did not say), its ``log`` and the launcher's output."""

    def __init__(self, message: str, rank: int | None = None, log: Path | None = None):
        super().__init__(message)
        self.rank, self.log = rank, log


def worker_command(workers: int, module_args: Sequence[str], log_dir: str | Path) -> list[str]:
    """The torchrun command that runs ``python -m tclab <module_args>`` on ``workers`` local processes, each
    rank's output in ``log_dir/<rank>/``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
            f"--log-dir={log_dir}", "--redirects=3", "--tee=0", "-m", "tclab", *module_args]


def launch_workers(workers: int, module_args: Sequence[str], log_dir: str | Path, on_poll: Callable[[], None] | None = None,
                   poll_seconds: float = 1.0) -> None:
    """Run ``python -m tclab <module_args>`` under torchrun on ``workers`` processes of this machine and wait.

    ``on_poll()`` is called about every ``poll_seconds`` while they run (a progress bar reads the shard
    folder). On failure raises :class:`WorkerFailedError` naming the first rank that died, how (exit code
    or signal) and its log; an interrupt stops every worker."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher_log = log_dir / "torchrun.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")   # one thread per worker on a CPU machine
    with open(launcher_log, "wb") as out:
        proc = subprocess.Popen(worker_command(workers, module_args, log_dir), stdout=out, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=_die_with_parent)
        try:
            while proc.poll() is None:
                if on_poll is not None:
                    on_poll()
                time.sleep(poll_seconds)
        except BaseException:   # an interrupt or a stop: torchrun passes SIGTERM on to its workers
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if on_poll is not None:
        on_poll()
    if proc.returncode != 0:
        raise _failure(proc.returncode, launcher_log, log_dir)


def _die_with_parent() -> None:
    """In the torchrun child, before it starts: on Linux, ask for SIGTERM when the launching process dies (even
    by SIGKILL), so no worker outlives the kernel or command that started it. Elsewhere nothing is done."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _failure(code: int, launcher_log: Path, log_dir: Path) -> WorkerFailedError:
    """Read torchrun's summary: its "Root Cause (first observed failure)" block names the rank and exit code."""
    text = launcher_log.read_text(errors="replace")
    cause = text.split("Root Cause", 1)[-1] if "Root Cause" in text else text
    rank_m = re.search(r"rank\s*:\s*(\d+)", cause)
    code_m = re.search(r"exitcode\s*:\s*(-?\d+)", cause)
    rank = int(rank_m.group(1)) if rank_m else None
    how = "exited with an error"
    if code_m:
        c = int(code_m.group(1))
        how = f"was killed by {signal.Signals(-c).name}" if c < 0 and -c in signal.valid_signals() else f"exited with code {c}"
    logs = sorted(log_dir.glob(f"**/attempt_*/{rank}/stderr.log")) if rank is not None else []
    log = logs[-1] if logs else launcher_log
    tail = _last_error_line(log)
    who = f"worker rank {rank}" if rank is not None else f"a worker (torchrun exit code {code})"
    return WorkerFailedError(f"{who} {how}{': ' + tail if tail else ''}; its log: {log}; the other workers were stopped "
                             "and nothing was merged. Finished shards are kept: run again with resume to continue",
                             rank=rank, log=log)


def _last_error_line(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln) or ln.startswith("tclab ")]
    return errors[-1][:300] if errors else ""
