"""The run's environment: devices, precision, and torch.distributed.

The only module that reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun). It picks the
device and the autocast dtype, starts and tears down the process group (nccl on CUDA, gloo on
CPU), wraps the model for data parallel (DDP) or sharded (FSDP2) training, and offers the few
collectives the training loop needs. With one process every helper is a cheap no-op, so the
loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td

from mypt.errors import MyPTError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

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
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ["WORLD_SIZE"]))


def print0(*args: object, **kwargs: object) -> None:
    if dist_info().is_main:
        print(*args, **kwargs, flush=True)


def pick_device(requested: str, info: DistInfo) -> torch.device:
    """'auto' -> cuda (this rank's GPU), then mps, then cpu; an unavailable device is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise MyPTError(f"--device {requested}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MyPTError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise MyPTError(f"--device {requested}: MPS is not available on this machine; use --device cpu")
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


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights stay fp32 and the loss is computed in fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float = 120.0) -> None:
    if info.enabled and not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                              device_id=device if device.type == "cuda" else None)


def destroy_process_group() -> None:
    if td.is_initialized():
        td.destroy_process_group()


@contextlib.contextmanager
def process_group(info: DistInfo, device: torch.device) -> Iterator[None]:
    """Process group for the duration of a run, torn down however the run ends."""
    init_process_group(info, device)
    try:
        yield
    finally:
        destroy_process_group()


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """Apply data parallelism from outside the model: DDP, or FSDP2 (fully_shard) per block."""
    if not info.enabled:
        if fsdp:
            raise MyPTError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-steps before the last one of an accumulation."""
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
    if td.is_initialized():
        td.barrier()


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded, prefix-free model and optimizer state (keyed by parameter name) on every rank.

    The one place where DDP's `module.`, torch.compile's `_orig_mod.` and FSDP sharding are
    undone, so a checkpoint looks the same whatever wrapped the model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=td.is_initialized())
    return get_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
