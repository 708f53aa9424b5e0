"""The run's environment: devices, precision, and torch.distributed.

The only module that reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun). It picks the
device and the autocast dtype, starts and tears down the process group (nccl on CUDA, gloo on
CPU), wraps the model for data parallel (DDP) training or builds it sharded (FSDP2, never whole
on one rank), and offers the few collectives the training loop needs. With one process every
helper is a cheap no-op, so the loop reads the same either way.

Files are rank 0's business: it plans the run (`from_main`), tokenizes first and writes every
checkpoint, while the other ranks wait on a separate group with a long timeout (`barrier`).
Training collectives use a short timeout, so a hung rank surfaces as an error in minutes; a
rank that dies (or a collective that fails) becomes `PeerLost` on the others.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as td

from mypt.errors import MyPTError, ReportedElsewhere

T = TypeVar("T")
COLLECTIVE_TIMEOUT_S = 120.0  # training collectives: ranks are never further apart than this
MAIN_WAIT_TIMEOUT_S = 3600.0  # waiting on rank 0's files: tokenizing, reading, saving
_main_wait_group: td.ProcessGroup | None = None
# How gloo and nccl word a failure of another rank (process gone, connection lost, timeout).
_PEER_FAILURE = ("closed by peer", "reset by peer", "broken pipe", "socket closed", "timed out")


class PeerLost(MyPTError):
    """Another process of the run died or stopped answering, so this one cannot go on."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """What torchrun told this process (one process when not launched by torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world,
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def print0(*args: object, **kwargs: object) -> None:
    if dist_info().is_main:
        print(*args, **kwargs, flush=True)


DEVICES = "auto, cpu, cuda, cuda:N or mps"  # what --device takes, in every command
_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d{1,4}))?")


def check_device(requested: str) -> torch.device | None:
    """The device --device names, refused by name unless MyPT runs on it here (None: auto).

    Every command's --device goes through this check: train, generate, eval, compare, serve.
    """
    m = _DEVICE.fullmatch(requested)
    kind = m.group(1) if m else None
    if kind is None or (m.group(2) is not None and kind != "cuda"):
        why = ("the meta device holds no data (it is for counting parameters), so nothing runs on it"
               if requested == "meta" else "unknown device, or one MyPT does not run on")
        raise MyPTError(f"--device {requested}: {why}; use {DEVICES}")
    if kind == "auto":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MyPTError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= count:
            raise MyPTError(f"--device {requested}: this machine has {count} CUDA GPU(s), cuda:0 to "
                            f"cuda:{count - 1}; pick one of them (or cuda: each process takes its own)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise MyPTError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
    return torch.device(requested)


def pick_device(requested: str, info: DistInfo) -> torch.device:
    """'auto' -> cuda (this rank's GPU), then mps, then cpu; check_device refuses the rest.

    Processes sharing a machine's CPU split its cores, so they do not slow each other down.
    """
    device = check_device(requested)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type == "cpu" and info.enabled:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cpus // info.local_world_size))
    return device


def cpu_has_fast_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def pick_dtype(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 where the device runs it fast, fp16 on CUDA GPUs without bf16, else fp32."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        bf16 = cpu_has_fast_bf16()
    else:
        bf16 = False
    if requested == "auto":
        if bf16:
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if requested == "bf16" and not bf16:
        raise MyPTError(f"--dtype bf16: {device.type} on this machine has no fast bfloat16 support; "
                        "use --dtype fp32 (or auto)")
    if requested == "fp16" and device.type != "cuda":
        raise MyPTError(f"--dtype fp16 needs a CUDA GPU (device is {device.type}); use --dtype bf16 or fp32")
    return requested


def check_compile(device: torch.device) -> None:
    """--compile on a CPU builds C++ kernels (inductor): without a compiler it would fail mid-run."""
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
        raise MyPTError("--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH: install one, "
                        "or train without --compile (on CPUs it is measured slower anyway, see BENCHMARKS.md)")


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights stay fp32 and the loss is computed in fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])


def init_process_group(info: DistInfo, device: torch.device) -> None:
    global _main_wait_group
    if info.enabled and not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                              device_id=device if device.type == "cuda" else None)
        _main_wait_group = td.new_group(backend="gloo", timeout=timedelta(seconds=MAIN_WAIT_TIMEOUT_S))


def destroy_process_group() -> None:
    global _main_wait_group
    if td.is_initialized():
        td.destroy_process_group()
    _main_wait_group = None


@contextlib.contextmanager
def process_group(info: DistInfo, device: torch.device) -> Iterator[None]:
    """Process group for the duration of a run, torn down however the run ends.

    A collective that fails because another rank died, or stopped answering, becomes PeerLost:
    one clear line per surviving rank instead of a traceback (or a hang).
    """
    init_process_group(info, device)
    try:
        yield
    except RuntimeError as exc:
        if not info.enabled or not _is_peer_failure(exc):
            raise
        with contextlib.suppress(ValueError):  # torchrun's shutdown must not cut the message short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise PeerLost(
            f"process {info.rank} of {info.world_size}: another process of this run stopped or stopped "
            f"answering ({_reason(exc)}); stopping too. Its own message, if any, says why. Checkpoints are "
            "only written whole, so the last one is intact: run the same command to resume"
        ) from None
    finally:
        destroy_process_group()


def _is_peer_failure(exc: BaseException) -> bool:
    if isinstance(exc, td.DistError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_FAILURE)


def _reason(exc: BaseException) -> str:
    """'Connection closed by peer [10.0.0.2]:4321' out of gloo's '[file.cc:553] Connection ... GLHF!'."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:200]


def from_main(make: Callable[[], T], share: Callable[[T], T] = lambda result: result) -> T:
    """make() on rank 0 only; every other rank gets share(result), or raises the same MyPTError.

    For the work done once, on rank 0's disk: checking the command against the files, reading
    the checkpoint. share() keeps what the other ranks need (not, say, the weights: those come
    by broadcast in wrap_model or sharded_model, and load_optimizer_state).
    """
    if not td.is_initialized():
        return make()
    box: list[object] = [None]
    if td.get_rank() == 0:
        try:
            result = make()
        except MyPTError as exc:
            box[0] = exc
            td.broadcast_object_list(box, src=0, group=_main_wait_group)
            raise
        box[0] = share(result)
        td.broadcast_object_list(box, src=0, group=_main_wait_group)
        return result
    td.broadcast_object_list(box, src=0, group=_main_wait_group)
    if isinstance(box[0], MyPTError):
        raise ReportedElsewhere(str(box[0]))  # rank 0 prints it
    return box[0]  # type: ignore[return-value]


def same_on_every_rank(check: Callable[[], T]) -> T:
    """check() where every rank gets the same answer (it only reads the command line): its
    MyPTError is printed by rank 0 alone."""
    try:
        return check()
    except MyPTError as exc:
        if dist_info().rank != 0:
            raise ReportedElsewhere(str(exc)) from None
        raise


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Apply data parallelism (DDP) from outside the model; with one process, the model itself.

    Every rank starts from rank 0's weights (DDP broadcasts them itself), so only rank 0 needs
    to load a checkpoint. A sharded model comes from `sharded_model` instead.
    """
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sharded_model(model: torch.nn.Module, info: DistInfo, device: torch.device,
                  weights: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """FSDP2 without the whole model on any rank: `model`, built on the meta device (no memory),
    is sharded there (fully_shard of each block, then of the root), and only then is each rank's
    shard allocated on `device` and filled, one parameter at a time.

    weights None: a new model, with the very weights the model's class builds on a CPU under the
    current seed (its construction draws, then its weight_inits). Otherwise rank 0's full state
    dict (the other ranks pass an empty one): sent tensor by tensor, each rank keeping its shard.
    """
    if not info.enabled:
        raise MyPTError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    if weights is None:
        _skip_construction_draws(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)
    if weights is None:
        _init_shards(model)
    else:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, dict(weights), options=options)
    return model


def _skip_construction_draws(model: torch.nn.Module) -> None:
    """Advance torch's CPU generator past what building `model` on a CPU draws (each layer's
    default initialisation, which the model's own then overwrites), one layer at a time, in
    module order: the order GPT builds its layers in (tests/fsdp_build.py checks the weights)."""
    for module in model.modules():
        if hasattr(module, "reset_parameters") and next(module.parameters(recurse=False), None) is not None:
            copy.deepcopy(module).to_empty(device="cpu").reset_parameters()


@torch.no_grad()
def _init_shards(model: torch.nn.Module) -> None:
    """Each parameter's initialisation drawn whole on the CPU (as an unsharded model's), then this
    rank's shard of it kept: one full parameter in memory at a time, never the model."""
    from torch.distributed.tensor import distribute_tensor

    for param, init in model.weight_inits():
        full = init(torch.empty(param.shape, dtype=param.dtype)).to(param.device)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))


def no_sync(model: torch.nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on micro-steps before the last one of an accumulation.

    FSDP reduce-scatters on every micro-step instead: holding unsharded gradients until the
    last one would cost the memory that sharding is there to save.
    """
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor across ranks (the value itself with one process)."""
    if td.is_initialized():
        value = value.clone()
        td.all_reduce(value, op=td.ReduceOp.SUM)
        value /= td.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: all ranks stop together, none hangs."""
    if not td.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for rank 0's file work (tokenizing, saving): a long timeout, not the collectives' one."""
    if td.is_initialized():
        td.barrier(group=_main_wait_group)


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded, prefix-free model and optimizer state (keyed by parameter name), on the CPU.

    Every rank must call it (FSDP gathers the shards); with several processes only rank 0 gets
    the state (the others get empty dicts), since only rank 0 writes checkpoints. The one place
    where DDP's `module.`, torch.compile's `_orig_mod.` and FSDP sharding are undone, so a
    checkpoint looks the same whatever wrapped the model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=td.is_initialized())
    return get_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """Load a full optimizer state (as full_state_dicts gives it) that only rank 0 needs to hold.

    Every rank must call it; the others pass None and get their part by broadcast (FSDP: their shard).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=td.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state or {}, options=options)
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        group.update(wanted)  # this run's flags (weight decay, betas) win over the saved ones
