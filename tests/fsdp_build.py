"""Run under torchrun by test_distributed: build new models as train.py does (with --fsdp given
as the first argument, or DDP) and print one JSON line per rank:

* rose, model, local: how far the process's peak memory rose while building a 12 layers x 512
  model (150 MB of fp32 weights, each parameter at most 4 MB, so that the whole model stands
  out from the allocator's noise), the bytes of its weights, and those this rank holds;
* same: on rank 0, for each architecture variant, whether the built weights are those of the
  unsharded model, GPT(cfg) under the same seed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mypt import dist
from mypt.config import ModelConfig, TrainConfig
from mypt.model import GPT
from mypt.train_run import RunPlan, build_for_training
from mypt.trainer import TrainState

VARIANTS = {
    "gpt2": {},
    "modern": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "qk_norm": True,
               "tie_embeddings": False, "bias": True},
    "zero_init": {"mlp": "relu2", "tie_embeddings": False, "zero_init": True},
}


def plan(n_layer: int, n_embd: int, **variant: object) -> RunPlan:
    cfg = ModelConfig.from_dict({"vocab_size": 256, "n_layer": n_layer, "n_head": 8, "n_embd": n_embd,
                                 "block_size": 64, "batch_size": 1, "dropout": 0.0, "bias": False, **variant},
                                "fsdp_build")
    return RunPlan(Path("unused"), cfg, TrainConfig(), None, [], TrainState(), None)


def memory_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def same_as_unsharded(p: RunPlan, info: dist.DistInfo, fsdp: bool) -> bool | None:
    model, _ = build_for_training(p, info, torch.device("cpu"), fsdp)
    got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    torch.manual_seed(p.train_cfg.seed)
    want = GPT(p.model_cfg).state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def main() -> None:
    torch.set_num_threads(1)
    fsdp = sys.argv[1:] == ["--fsdp"]
    info, device = dist.dist_info(), torch.device("cpu")
    with dist.process_group(info, device):
        same = {name: same_as_unsharded(plan(2, 64, **variant), info, fsdp) for name, variant in VARIANTS.items()}
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
        before = memory_kb("VmRSS")
        model, _ = build_for_training(plan(12, 512), info, device, fsdp)
        rose = (memory_kb("VmHWM") - before) * 1024
        local = sum((p.to_local() if fsdp else p).numel() * p.element_size() for p in model.parameters())
        line = json.dumps({"rank": info.rank, "rose": rose, "model": 4 * model.num_params(), "local": local,
                           "same": same})
        sys.stdout.write(line + "\n")  # one write: print's text and newline could interleave with the other rank's
        sys.stdout.flush()
        dist.barrier()


if __name__ == "__main__":
    main()
