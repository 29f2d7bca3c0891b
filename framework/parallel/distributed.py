"""Process-group set-up shared by training and inference, whatever launched us.

torchrun, the deepspeed launcher and Slurm's srun all end up here; a plain ``python -m`` run becomes a world of
one. The device and backend are chosen from what is there (cuda+nccl, else cpu+gloo) unless the config forces
them.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from framework.cli import JOINED_PROCESS_GROUP, UserError

# The timeout the world group was created with (init_distributed). Every extra group the engine creates takes it
# explicitly (``new_group``): torch's default for a group created without one is 10 minutes for NCCL and 30 for
# gloo whatever the world group got, so an idle server's groups would die long before the server's own timeout.
_GROUP_TIMEOUT = [datetime.timedelta(minutes=30)]


def env_rank_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (torchrun, deepspeed, Slurm)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible: use device=cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}': use auto, cpu or cuda")
    if device == "cuda":
        _, local, _ = env_rank_world()
        gpus = torch.cuda.device_count()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or local + 1)
        if max(per_node, local + 1) > gpus:
            # NCCL refuses two ranks on one GPU much later ("Duplicate GPU detected"): say it now.
            raise UserError(f"{max(per_node, local + 1)} processes on this node but {gpus} GPU(s) visible: launch one "
                            f"process per GPU (--nproc_per_node={gpus}, NPROC={gpus}) or use device=cpu")
        torch.cuda.set_device(local)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(device: torch.device, backend: str = "auto") -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def init_distributed(device: torch.device, backend: str = "auto", timeout_s: int = 600) -> tuple[int, int]:
    """Join (or create) the default process group; returns (rank, world_size)."""
    rank, _, world = env_rank_world()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    timeout = datetime.timedelta(seconds=timeout_s)
    _GROUP_TIMEOUT[0] = timeout
    store_kw = {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
        # torchrun restarted us after a failure: its store still holds the dead workers' gloo addresses under the
        # same keys, and a restarted rank can read them before its peers overwrite them. A prefix per attempt
        # keeps each attempt's rendezvous apart.
        tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                            timeout=timeout)
        store_kw = {"store": dist.PrefixStore(f"/miaotui/attempt_{restart}", tcp), "rank": rank, "world_size": world}
    JOINED_PROCESS_GROUP[0] = True  # the process leaves through framework.cli.leave
    dist.init_process_group(
        backend=pick_backend(device, backend),
        timeout=timeout,
        **store_kw,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return dist.get_rank(), dist.get_world_size()


def group_timeout() -> datetime.timedelta:
    """The timeout of this job's process groups: the one ``init_distributed`` gave the world group."""
    return _GROUP_TIMEOUT[0]


def new_group(ranks: list[int] | None = None, backend: str | None = None):
    """``dist.new_group`` with the world group's timeout, given explicitly (see ``_GROUP_TIMEOUT``). Every rank calls
    it for every group, in the same order (torch's rule for ``new_group``)."""
    return dist.new_group(ranks, timeout=group_timeout(), backend=backend)


def wait_polled(work, deadline_s: float, what: str, poll_s: float = 5e-5) -> None:
    """Wait for an asynchronous CUDA/NCCL operation (a ``Work``, or a ``torch.cuda.Event`` recorded after it) without
    blocking the host inside the driver: poll ``work.is_completed()`` (which queries the operation's CUDA event), or
    ``event.query()``, and sleep in between, so that a dead peer
    becomes a ``TimeoutError`` after ``deadline_s`` instead of a hang, and Python keeps running its signal handlers
    (they only run between bytecodes, never inside a blocked ``work.wait()`` or a device -> host copy). Polls every
    ``poll_s`` for the first 50 ms (a decode step's answer is late by at most that), then backs off to 10 ms (a long
    wait costs no core)."""
    start = time.monotonic()
    pause = poll_s
    done = work.is_completed if hasattr(work, "is_completed") else work.query
    while not done():
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise TimeoutError(f"{what}: no answer within {deadline_s:g} s (the process groups' timeout): "
                               f"a stage has died or hangs")
        time.sleep(pause)
        if waited > 0.05:
            pause = min(pause * 2, 0.01)
    if hasattr(work, "wait"):
        work.wait()  # completed: raises the operation's error, if it failed, and orders this stream after it


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0, group=None):
    """Broadcast a picklable object from ``src`` (identity in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def destroy() -> None:
    """Leave together, then tear the process group down: a rank that exits while its peers still talk (or with
    receives they answered a moment ago) can abort in gloo's teardown."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
