"""The training run's process group: joining it, leaving it, and the few collectives the loop needs.

    rank, world = init_distributed()     # under the DeepSpeed launcher, or a one-rank group alone
    ...
    leave_distributed(finished=True)     # only in a process about to exit

CPU ranks talk over gloo, GPU ranks over NCCL. A rank alone meets itself through a file store, and
the stage's single-node relaunch (`stages.train.relaunch`) hands its ranks a file store too, so no
rendezvous port listens beyond this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

# Set by the stage's single-node relaunch: the ranks meet through a file store in this folder. A TCP
# rendezvous store (torch's env:// default) listens on every interface, whatever MASTER_ADDR says.
RENDEZVOUS_ENV = "RMPIPE_RENDEZVOUS_DIR"
_rendezvous_dir: Path | None = None  # the one-rank file store, removed by leave_distributed


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_shm_comm_op() -> None:
    """Tell DeepSpeed its CPU shared-memory comm op is unavailable, so init does not JIT-compile it.

    Training never calls that op (gloo does the all-reduce), yet compiling it costs 1-3 minutes on a
    2-core machine, again each time the shared torch_extensions cache is rebuilt by another
    environment. DeepSpeed keeps its op-compatibility table in a module dict meant to be edited.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> tuple[int, int]:
    """Join (or, without a launcher, create a one-rank) process group; returns (rank, world_size)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    # Without a launcher, one rank meets itself through a file, not a TCP port another process could take.
    alone = "WORLD_SIZE" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = None if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            _skip_shm_comm_op()
        rendezvous = {}
        if alone:
            global _rendezvous_dir
            _rendezvous_dir = Path(tempfile.mkdtemp(prefix="rmpipe-rendezvous-"))
            rendezvous = {"init_method": f"file://{_rendezvous_dir / 'store'}", "rank": 0, "world_size": 1}
        elif os.environ.get(RENDEZVOUS_ENV):
            rendezvous = {"init_method": f"file://{Path(os.environ[RENDEZVOUS_ENV]) / 'store'}",
                          "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **rendezvous)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed(finished: bool) -> None:
    """Leave the process group before the process exits.

    Left to interpreter shutdown, gloo's worker threads can abort a rank with "terminate called without an
    active exception" after all the work is done. Only for a process about to exit: DeepSpeed caches its
    sub-groups in module globals, so a group destroyed in a long-lived process cannot be re-created there.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()  # no rank tears down its connections while another still talks to it
        dist.destroy_process_group()
    if _rendezvous_dir is not None:
        shutil.rmtree(_rendezvous_dir, ignore_errors=True)


def make_deterministic(seed: int, world_size: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(world_size))


def cpu_threads(world_size: int) -> int:
    """Threads per rank on CPU: OMP_NUM_THREADS where the user set it (a machine shared with other jobs),
    else the cores split between the ranks on this node. Oversubscribed cores make every rank slow: an
    OpenMP thread spins at each barrier waiting for one that is descheduled."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_SIZE", world_size))))


# --- collectives ------------------------------------------------------------------------------
def _comm_device() -> str:
    """NCCL reduces GPU tensors only; gloo CPU tensors."""
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_agree(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def reduce_sum(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def reduce_max(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
