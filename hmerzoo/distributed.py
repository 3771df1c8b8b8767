"""Training on several processes with PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

Launch::

    hmerzoo train RECIPE --nproc-per-node N ...        # one machine: relaunches itself through torch.distributed.run
    torchrun --nproc-per-node N -m hmerzoo train RECIPE ...                    # the same, by hand
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT ... -m hmerzoo train RECIPE ...   # several machines

Every process reads RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR / MASTER_PORT, through ``env://``) from the
environment torchrun sets, joins the process group (NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``; gloo on
CPU) and trains its shard of whole buckets; gradients are averaged by DDP. With WORLD_SIZE 1 (or no torchrun) the
trainer runs as a single process, exactly as before. The loop's use of all this is in :mod:`hmerzoo.training`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import HmerzooError

# Set by ``hmerzoo train --nproc-per-node`` before it relaunches itself: the relaunched processes ignore the flag.
ENV_RELAUNCHED = "HMERZOO_NPROC_RELAUNCHED"
NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")

T = TypeVar("T")


@dataclasses.dataclass
class DistEnv:
    """Where this process stands in the job. ``DistEnv()`` is a single process (every helper is then a no-op)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the device of this rank (None: single process, the trainer chooses)
    owns_group: bool = False  # this module created the process group (and destroys it in close())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        if dist.get_backend() == "nccl":
            return self.device if self.device is not None and self.device.type == "cuda" else \
                torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) into every rank's ``module``. DDP broadcasts them at the
        start of each training forward, after which each rank updates its own copy from its own bucket; sharded
        validation must run the same model everywhere."""
        if self.enabled:
            with torch.no_grad():
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` evaluated on rank 0 only; its result (or its error, as an HmerzooError) on every rank."""
        if not self.enabled:
            return fn()
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = ("ok", fn())
            except Exception as e:  # every rank must leave the broadcast below, so the error travels too
                error = e
                result = ("error", str(e) if isinstance(e, HmerzooError) else f"{type(e).__name__}: {e}")
        kind, value = self.broadcast(result)
        if error is not None:
            raise error
        if kind == "error":
            raise HmerzooError(f"rank 0: {value}")
        return value

    def barrier(self) -> None:
        if self.enabled:
            if self.device is not None and self.device.type == "cuda" and dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the process group (only if this module created it)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise HmerzooError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_device(name: str, local_rank: int) -> torch.device:
    """``train.device`` of one rank: auto/cuda -> ``cuda:LOCAL_RANK`` (auto -> cpu without CUDA); cpu -> cpu."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise HmerzooError(f"train.device={name}: CUDA is not available here; use train.device=cpu (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise HmerzooError(f"LOCAL_RANK={local_rank} but this machine has only {torch.cuda.device_count()} CUDA "
                               "devices; start at most that many processes per node (--nproc-per-node)")
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:"):
        raise HmerzooError(f"train.device={name}: with several processes each one uses cuda:LOCAL_RANK; set "
                           "train.device=cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    raise HmerzooError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")


def setup_distributed(device_name: str) -> DistEnv:
    """Join the job torchrun started (WORLD_SIZE > 1) or an already initialised process group; else single.

    Creates the process group when there is none: NCCL for CUDA devices, gloo for CPU, rendezvous through the
    environment (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
    """
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if world_size == 1:
            return DistEnv()
        local_rank = _env_int("LOCAL_RANK", rank)
        device = distributed_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, owns_group=False)

    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistEnv()
    if not dist.is_available():
        raise HmerzooError(f"WORLD_SIZE={world_size}, but this PyTorch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise HmerzooError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set; start several processes "
                           "with torchrun (or hmerzoo train ... --nproc-per-node N)")
    device = distributed_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group(backend="gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, owns_group=True)


def wrap_ddp(model: torch.nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` for the training forward/backward (the model itself stays reachable
    as ``.module`` and is what the trainer validates and saves). Single process: the model unchanged."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device is not None and env.device.type == "cuda" else None
    # The model's forward returns {"loss", "losses", "output"}: with find_unused_parameters=False DDP does not walk
    # the output, and every trainable parameter must take part in each training forward (true of the shipped
    # models); train.find_unused_parameters=true is for models where some do not.
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


# --- ``hmerzoo train --nproc-per-node N`` -------------------------------------------------------------------
def _is_nproc_flag(token: str) -> bool:
    """``--nproc-per-node`` / ``--nproc_per_node``, or an abbreviation argparse accepts (``--nproc``)."""
    name = token.split("=", 1)[0]
    return name.startswith("--n") and any(flag.startswith(name) for flag in NPROC_FLAGS)


def strip_nproc_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` / ``--nproc-per-node=N`` (and abbreviations)."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            out.extend(tokens[i:])
            break
        if _is_nproc_flag(token):
            i += 1 if "=" in token else 2
            continue
        out.append(token)
        i += 1
    return out


def torchrun_argv(nproc_per_node: str | int, hmerzoo_argv: Sequence[str]) -> list[str]:
    """Arguments of ``torch.distributed.run`` that start ``nproc_per_node`` copies of ``hmerzoo <hmerzoo_argv>``
    on this machine (``--standalone``: a private rendezvous on a free local port)."""
    return ["--standalone", "--nproc-per-node", str(nproc_per_node), "-m", "hmerzoo", *hmerzoo_argv]


def check_nproc(value: str) -> str:
    """The ``--nproc-per-node`` value: a positive integer, or torchrun's auto / gpu / cpu."""
    if value in ("auto", "gpu", "cpu"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise HmerzooError(f"--nproc-per-node: expected a positive integer or auto/gpu/cpu, got {value!r}") from None
    if n < 1:
        raise HmerzooError(f"--nproc-per-node: expected a positive integer, got {n}")
    return str(n)


def relaunch_with_torchrun(nproc_per_node: str | int, argv: Sequence[str]) -> int:
    """Run ``hmerzoo <argv minus --nproc-per-node>`` in ``nproc_per_node`` processes through
    ``torch.distributed.run.main``; returns an exit status (that of the first process to fail, or 0)."""
    if launched_by_torchrun() and not os.environ.get(ENV_RELAUNCHED):
        raise HmerzooError("--nproc-per-node: this process was already started by torchrun; give the number of "
                           "processes to torchrun only")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args = torchrun_argv(check_nproc(str(nproc_per_node)), strip_nproc_flag(argv))
    os.environ[ENV_RELAUNCHED] = "1"  # inherited by the workers: they run, they do not relaunch
    try:
        torchrun_main(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    except SignalException:
        return 130
    finally:
        os.environ.pop(ENV_RELAUNCHED, None)
    return 0
