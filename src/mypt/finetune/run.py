"""One fine-tuning run, new or resumed: a base model trained on conversations into a chat model.

A new fine-tune reads BASE (a model in the checkpoints folder, a MyPT checkpoint folder, or a
transformers folder as `mypt import` reads it) and never writes to it. Its tokenizer gains the
chat tokens where it lacks them (a tokenizer saved before they were reserved, an imported
one); the embedding (and an untied output layer) then grows to the tokenizer's padded size.
Each new row is the mean of the rows of the base tokenizer's ids plus Gaussian noise of a tenth
of their standard deviation: the mean gives a new token an average logit, so the base never
starts out predicting it (a random row can give it any logit), and the noise tells the four
apart. NEW is an ordinary checkpoint folder whose training_state.json records the base's name
and the sha256 of its weights ("finetune"), and whose tokenizer.json names the chat template.

Everything else is a train.py run (mypt.train_run): the Trainer, the schedule, evaluation,
best/, --keep_every, Ctrl-C, crash-safe saves, the memory check, torchrun data parallel, and
exact resume (`mypt finetune --model_name NEW` again). The batches come from packed
conversations (mypt.finetune.packing); the defaults below suit fine-tuning and are printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mypt import data, dist
from mypt.build import check_weights_fit, checkpoint_tokenizer
from mypt.checkpoint import (
    CONFIG_FILE,
    SAVED,
    STATE_FILE,
    Checkpoint,
    checkpoint_dir,
    folder_state,
    list_models,
    load_checkpoint,
    recover,
    training_lock,
)
from mypt.config import (
    LoRAConfig,
    ModelConfig,
    TrainConfig,
    apply_arch_flags,
    check_train_flags,
    new_run_train_config,
    resume_train_config,
    saved_train_config,
)
from mypt.errors import MyPTError
from mypt.finetune import DEFAULT_EPOCHS, DEFAULTS, LORA_LR_FACTOR, LR_FRACTION, chat_data, template
from mypt.finetune.lora import fresh_adapters
from mypt.finetune.packing import ChatBatches, Packed, pack, to_device
from mypt.fsutil import FileLock, json_bytes, sha256_file
from mypt.metrics import read_metrics
from mypt.optim import check_optimizer, saved_optimizer
from mypt.tokenizers import Tokenizer
from mypt.train_run import (
    RunPlan,
    check_folders,
    check_memory,
    fit_world_size,
    for_other_ranks,
    load_eval_tasks,
    run_plan,
    schedule_note,
)
from mypt.trainer import Stop, Trainer, TrainState

COMMAND = "-m mypt finetune"  # after "python " or "torchrun ... ": what resumes a fine-tune
NOISE = 0.1  # a grown row's noise, in standard deviations of the existing rows


def finetune(*, model_name: str, base: str | None, checkpoints_dir: Path, input_files: list[str] | None,
             data_file: str | None, form: str | None, epochs: int | None, arch_flags: dict[str, Any],
             train_flags: dict[str, Any], device: str, allow_data_change: bool = False, fsdp: bool = False,
             skip_memory_check: bool = False, lora: dict[str, Any] | None = None,
             eval_tasks: list[str] | None = None) -> Stop:
    info = dist.dist_info()
    tasks = dist.same_on_every_rank(lambda: load_eval_tasks(eval_tasks, fsdp))
    ckpt_dir = dist.same_on_every_rank(lambda: checkpoint_dir(checkpoints_dir, model_name))
    dist.same_on_every_rank(lambda: _check_flags(train_flags, epochs))
    sources = dist.same_on_every_rank(lambda: data.sources_from_flags(input_files, None, data_file))
    torch_device = dist.pick_device(device, info)
    locks: list[FileLock] = []

    def make_plan() -> RunPlan:
        check_folders(ckpt_dir)
        if ckpt_dir.parent.is_dir():
            locks.append(training_lock(ckpt_dir))
            locks[0].acquire()
            recover(ckpt_dir)
        if folder_state(ckpt_dir) == SAVED:  # a folder with anything else in it is refused, never trained over
            if lora is not None:
                dist.print0(f"warning: --lora_* ignored: resuming '{ckpt_dir.name}' keeps the adapters it started with")
            plan = _plan_resume(ckpt_dir, base, sources, form, epochs, arch_flags, train_flags, allow_data_change,
                                info)
        else:
            plan = _plan_new(ckpt_dir, base, checkpoints_dir, sources, form, epochs, arch_flags, train_flags, info,
                             lora)
        tc = plan.train_cfg
        if plan.state.iteration >= tc.max_iters:
            return plan
        dtype = dist.pick_dtype(tc.dtype, torch_device)
        if tc.compile:
            dist.check_compile(torch_device)
        if plan.state.iteration > 0:
            fit_world_size(plan, info.world_size, "grad_accum_steps" in train_flags)
        saved = saved_optimizer(plan.resume.training_state) if plan.resume.has_optimizer else None
        check_optimizer(plan.train_cfg, fsdp, saved, given=train_flags)
        if skip_memory_check:  # weights alone beyond the device's memory could never run all the same
            check_weights_fit(plan.model_cfg, torch_device)
        else:
            check_memory(plan.model_cfg, plan.train_cfg, dtype, torch_device, info, fsdp)
        return plan

    with dist.process_group(info, torch_device), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [lock.release() for lock in locks])
        plan = dist.from_main(make_plan, share=lambda p: replace(for_other_ranks(p), splits=p.splits))
        if plan.state.iteration >= plan.train_cfg.max_iters:
            dist.print0(f"'{model_name}' is already fine-tuned to iteration {plan.state.iteration}; nothing to do "
                        f"(pass a --max_iters above {plan.state.iteration}, or more --epochs, to train further)")
            return Stop()
        dtype = dist.pick_dtype(plan.train_cfg.dtype, torch_device)
        if info.is_main and not locks:
            locks.append(training_lock(ckpt_dir))
            locks[0].acquire()
        return run_plan(plan, info, torch_device, dtype, fsdp, tasks)


def _check_flags(train_flags: dict[str, Any], epochs: int | None) -> None:
    check_train_flags(train_flags)
    if epochs is not None and "max_iters" in train_flags:
        raise MyPTError(f"--epochs {epochs} and --max_iters {train_flags['max_iters']} both set the length of the "
                        "run; pass one of them")
    if epochs is not None and epochs <= 0:
        raise MyPTError(f"--epochs ({epochs}) must be a positive integer")


# ---------------------------------------------------------------------------------------------
# The base model


def load_base(base: str, checkpoints_dir: Path) -> tuple[Checkpoint, dict[str, Any]]:
    """BASE's checkpoint (weights on the CPU) and what NEW records of it (name, sha256, path)."""
    named = Path(checkpoints_dir) / base
    if "/" not in base and (named / CONFIG_FILE).is_file():
        ckpt = load_checkpoint(checkpoint_dir(checkpoints_dir, base))
        return ckpt, _record(base, ckpt.path, _checkpoint_sha256(ckpt))
    folder = Path(base)
    if (folder / STATE_FILE).is_file():
        ckpt = load_checkpoint(folder)
        return ckpt, _record(str(folder.resolve()), folder, _checkpoint_sha256(ckpt))
    if (folder / CONFIG_FILE).is_file():
        from mypt.formats.hf import read_hf

        cfg, state, tok, notes, family = read_hf(folder)
        for note in notes:
            dist.print0(f"note: {note}")
        ckpt = Checkpoint(cfg.to_dict(), tok.to_json(), {}, state, None, folder, has_optimizer=False)
        return ckpt, {**_record(str(folder.resolve()), folder, _hf_sha256(folder)), "imported": family}
    existing = ", ".join(list_models(checkpoints_dir)) or "none"
    raise MyPTError(f"--from {base}: no model of that name in {checkpoints_dir}/ (models there: {existing}) and no "
                    "such checkpoint or transformers folder; pass a model name or a folder")


def _record(name: str, path: Path, sha256: str) -> dict[str, Any]:
    return {"base_model": name, "base_sha256": sha256, "base_path": str(Path(path).resolve())}


def _checkpoint_sha256(ckpt: Checkpoint) -> str:
    """The sha256 of the weights file (the manifest's, which load_checkpoint checked against the bytes)."""
    entry = (ckpt.training_state.get("manifest") or {}).get(ckpt.weights_file)
    return entry["sha256"] if entry else sha256_file(ckpt.path / ckpt.weights_file)


def _hf_sha256(folder: Path) -> str:
    """model.safetensors' sha256; for shards, the sha256 of their names and hashes."""
    from mypt.formats.hf import HF_WEIGHTS

    if (folder / HF_WEIGHTS).is_file():
        return sha256_file(folder / HF_WEIGHTS)
    shards = sorted(folder.glob("model-*.safetensors"))
    return hashlib.sha256(json_bytes([[p.name, sha256_file(p)] for p in shards])).hexdigest()


def grow_vocab(state: dict[str, torch.Tensor], cfg: ModelConfig, rows: int, old_tokens: int,
               seed: int) -> dict[str, torch.Tensor]:
    """The weights with the embedding (and an untied output layer) grown to `rows` rows: each new
    row the mean of the first old_tokens rows plus noise (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    names = ["transformer.wte.weight"] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
    out = dict(state)
    for name in names:
        old = state[name]
        used = old[:old_tokens].float()
        noise = torch.randn(rows - old.size(0), old.size(1), generator=generator) * NOISE * used.std()
        out[name] = torch.cat([old, (used.mean(dim=0) + noise).to(old.dtype)])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _chat_base(ckpt: Checkpoint, cfg: ModelConfig, seed: int) -> tuple[Checkpoint, ModelConfig, Tokenizer]:
    """The base as the fine-tune starts from it: the chat tokenizer, the vocabulary grown if needed."""
    old = checkpoint_tokenizer(ckpt, cfg)
    tok = old.with_chat()
    tok.chat_format = template.TEMPLATE
    state = ckpt.model_state
    if not old.chat:
        added = f"the base's {old.kind} tokenizer has no chat tokens: added {', '.join(tok.chat_ids)}"
        if cfg.vocab_size >= tok.n_vocab:
            ids = list(tok.chat_ids.values())
            dist.print0(f"{added} (ids {ids[0]}-{ids[-1]}, rows the base's {cfg.vocab_size}-row embedding already has)")
        else:
            grown = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": tok.model_vocab_size()}, "config")
            state = grow_vocab(state, cfg, grown.vocab_size, old.n_vocab, seed)
            more = sum(state[n].numel() - ckpt.model_state[n].numel() for n in ("transformer.wte.weight",
                                                                                 "lm_head.weight")
                       if n in state and not (cfg.tie_embeddings and n == "lm_head.weight"))
            layers = "embedding" if cfg.tie_embeddings else "embedding and the output layer"
            dist.print0(f"{added}; the {layers} grow from {cfg.vocab_size} to {grown.vocab_size} rows (+{more:,} "
                        "parameters; new rows: the mean of the base's rows plus noise)")
            cfg = grown
    start = replace(ckpt, config=cfg.to_dict(), tokenizer=tok.to_json(), model_state=state, optimizer_state=None,
                    has_optimizer=False)  # the base's optimizer state is not this run's
    return start, cfg, tok


def _with_adapters(start: Checkpoint, cfg: ModelConfig, lora: LoRAConfig, tok: Tokenizer,
                   seed: int) -> tuple[Checkpoint, ModelConfig]:
    """The starting checkpoint with new LoRA adapters (B zero: the base's function at first) and
    the chat tokens' rows trained beside them (finetune/lora.py)."""
    if cfg.lora is not None:
        raise MyPTError("--lora_rank: the base is itself a LoRA fine-tune; export it merged (mypt export "
                        "--format safetensors) and fine-tune that, or fine-tune it without --lora_rank")
    lora = replace(lora, tokens=tuple(sorted(tok.chat_ids.values())))
    adapters = fresh_adapters(cfg, lora, seed)
    total = sum(t.numel() for t in start.model_state.values())
    trained = sum(t.numel() for t in adapters.values())
    rows = "output rows" if not cfg.tie_embeddings else "rows (tied to the output layer)"
    dist.print0(f"LoRA rank {lora.rank} (alpha {lora.alpha:g}, dropout {lora.dropout:g}) on the blocks' "
                f"{lora.targets} linear layers, and the {len(lora.tokens)} chat tokens' embedding and {rows}: "
                f"{trained:,} trainable parameters; the base's {total:,} are frozen")
    cfg = replace(cfg, lora={**dataclasses.asdict(lora), "tokens": list(lora.tokens)})
    return replace(start, config=cfg.to_dict(), model_state={**start.model_state, **adapters}), cfg


def _arch(cfg: ModelConfig, arch_flags: dict[str, Any], source: str, new: bool) -> ModelConfig:
    """--batch_size and --dropout: a new fine-tune takes them over the base's; a resume keeps its own."""
    given = {k: v for k, v in arch_flags.items() if v is not None}
    if new:
        return ModelConfig.from_dict({**cfg.to_dict(), **given}, "command line") if given else cfg
    cfg, warnings = apply_arch_flags(cfg, given, source)
    for w in warnings:
        dist.print0(f"warning: {w}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Planning


def _plan_new(ckpt_dir: Path, base: str | None, checkpoints_dir: Path, sources: list[data.Source] | None,
              form: str | None, epochs: int | None, arch_flags: dict[str, Any], train_flags: dict[str, Any],
              info: dist.DistInfo, lora: dict[str, Any] | None = None) -> RunPlan:
    if base is None:
        raise MyPTError(f"there is no fine-tune '{ckpt_dir.name}' in {ckpt_dir.parent}/ yet: start one with "
                        f"--from BASE (the model to fine-tune) and --input_file CHAT.jsonl")
    if sources is None:
        raise MyPTError("--input_file: name the conversations to fine-tune on (JSON lines or Parquet, one "
                        f"conversation per line: {chat_data.EXAMPLE})")
    ckpt, record = load_base(base, checkpoints_dir)
    cfg = ModelConfig.from_dict(ckpt.config, f"{ckpt.path}/config.json")
    cfg = _arch(replace(cfg, training={}), arch_flags, "", new=True)  # the base's pretraining settings: not ours
    seed = train_flags.get("seed", TrainConfig.seed)
    base_vocab = cfg.vocab_size
    start, cfg, tok = _chat_base(ckpt, cfg, seed)
    if lora is not None:
        start, cfg = _with_adapters(start, cfg, LoRAConfig(**lora), tok, seed)
    val_split = train_flags.get("val_split", TrainConfig.val_split)
    parts, train, val = _read_data(sources, form, tok, cfg.block_size, val_split)
    values = _defaults(train, val, cfg, train_flags, epochs, info, _base_lr(ckpt)) | train_flags
    tc, _ = new_run_train_config(cfg, values)
    # base_vocab_size below the fine-tune's vocab_size: the base grew, and a PEFT export carries the grown layers
    state = {**_data_state(sources, parts), "finetune": {**record, "base_vocab_size": base_vocab,
                                                         "template": template.TEMPLATE, "format": form}}
    dist.print0(f"fine-tuning '{record['base_model']}' into '{ckpt_dir.name}' (the base is read, never written)")
    return RunPlan(ckpt_dir, cfg, tc, tok, sources, TrainState(), start, splits=(train, val), trainer=SFTTrainer,
                   data_state=state, command=COMMAND)


def _plan_resume(ckpt_dir: Path, base: str | None, sources: list[data.Source] | None, form: str | None,
                 epochs: int | None, arch_flags: dict[str, Any], train_flags: dict[str, Any],
                 allow_data_change: bool, info: dist.DistInfo) -> RunPlan:
    ckpt = load_checkpoint(ckpt_dir, with_optimizer=True)
    read_metrics(ckpt_dir)  # each evaluation rewrites it: one that is not a file is refused now
    ts, source = ckpt.training_state, f"{ckpt_dir}/{STATE_FILE}"
    ft = ts.get("finetune")
    if not isinstance(ft, dict):
        raise MyPTError(f"'{ckpt_dir.name}' is not a fine-tune (train.py trained it): to fine-tune it, pass --from "
                        f"{ckpt_dir.name} and a new --model_name")
    if base is not None and base != ft.get("base_model"):
        raise MyPTError(f"--from {base}: '{ckpt_dir.name}' is a fine-tune of '{ft.get('base_model')}'; leave --from "
                        "out to resume it, or pick a new --model_name")
    cfg = _arch(ModelConfig.from_dict(ckpt.config, f"{ckpt_dir}/{CONFIG_FILE}"), arch_flags,
                f"{ckpt_dir}/{CONFIG_FILE}", new=False)
    tok = checkpoint_tokenizer(ckpt, cfg)
    template.check_template(tok, f"{ckpt_dir}/tokenizer.json")
    state = TrainState.from_saved(ts, source)
    saved = saved_train_config(ts, source)
    if "val_split" in train_flags and train_flags["val_split"] != saved.get("val_split") and not allow_data_change:
        raise MyPTError(f"--val_split {train_flags['val_split']}: '{ckpt_dir.name}' was fine-tuned with --val_split "
                        f"{saved.get('val_split')}; leave it out, or pass --allow_data_change to accept the change")
    saved_sources, saved_sha = data.saved_sources(ts, source)
    sources = sources or saved_sources
    if sources is None or data.missing_inputs(sources):
        raise MyPTError(f"'{ckpt_dir.name}' was fine-tuned on {data.describe_sources(saved_sources)}, which is not "
                        "here; pass --input_file (and --allow_data_change if its content differs)")
    form = form or ft.get("format")
    val_split = train_flags.get("val_split", saved.get("val_split", TrainConfig.val_split))
    parts, train, val = _read_data(sources, form, tok, cfg.block_size, val_split)
    sha = chat_data.content_hash(parts)
    if sha != saved_sha and not allow_data_change:
        raise MyPTError(f"--input_file {data.describe_sources(sources)}: its content differs from the conversations "
                        f"'{ckpt_dir.name}' was fine-tuned on; pass --allow_data_change to continue on the new data")
    flags = dict(train_flags)
    if epochs is not None:
        flags["max_iters"] = epochs * _iters_per_epoch(train, cfg, flags.get("grad_accum_steps", saved.get(
            "grad_accum_steps", 1)), info)
    tc = resume_train_config(saved, flags)
    dist.print0(f"resuming the fine-tune '{ckpt_dir.name}' of '{ft.get('base_model')}' from iteration "
                f"{state.iteration}")
    dist.print0(schedule_note(tc, state.iteration, "lr_decay_iters" in train_flags))
    data_state = {**_data_state(sources, parts), "finetune": {**ft, "format": form}}
    return RunPlan(ckpt_dir, cfg, tc, tok, sources, state, ckpt, saved_sha, splits=(train, val), trainer=SFTTrainer,
                   data_state=data_state, command=COMMAND)


def _data_state(sources: list[data.Source], parts: list[chat_data.ChatSource]) -> dict[str, Any]:
    """training_state.json's data fields, as the data package writes them (mypt inspect reads them)."""
    sha = chat_data.content_hash(parts)
    return {"input_file": data.describe_sources(sources), "input_sha256": sha,
            "data": {"sources": [s.to_json() for s in sources], "content_sha256": sha}}


def _read_data(sources: list[data.Source], form: str | None, tok: Tokenizer, block_size: int, val_split: float
               ) -> tuple[list[chat_data.ChatSource], ChatBatches, ChatBatches]:
    """Every source read, checked, split and packed; a summary printed."""
    parts = chat_data.read_sources(sources, form, val_split)
    packed: dict[str, list[Packed]] = {"train": [], "val": []}
    for p in parts:
        for split, conversations in (("train", p.train), ("val", p.val)):
            encoded = (template.turns(tok, c.messages, c.where) for c in conversations)
            packed[split].append(pack(encoded, block_size, tok.eot_id))
    for p, t, v in zip(parts, packed["train"], packed["val"], strict=True):
        dist.print0(_describe(p, t, v, block_size))
    for split, name in (("train", "training"), ("val", "validation")):
        empty = [p.source for p, k in zip(parts, packed[split], strict=True) if k.rows == 0]
        if empty:
            raise MyPTError(f"{chat_data.label(empty[0])}: no {name} conversation fits in block_size + 1 = "
                            f"{block_size + 1} tokens with an assistant message; use shorter conversations")
    weights = [p.source.weight for p in parts]
    return parts, ChatBatches(packed["train"], weights), ChatBatches(packed["val"], weights)


def _describe(p: chat_data.ChatSource, train: Packed, val: Packed, block_size: int) -> str:
    line = (f"data: {chat_data.label(p.source)}: {p.files} file(s), {len(p.train) + len(p.val):,} conversations "
            f"({len(p.val):,} held out for validation); packed into {train.rows:,} + {val.rows:,} rows of "
            f"{block_size + 1} tokens; {train.trained_fraction():.1%} of the training targets are trained on "
            "(the assistant's tokens)")
    cut, dropped = train.cut + val.cut, train.dropped + val.dropped
    if cut:
        line += f"; {cut:,} conversations longer than a row cut at a message boundary"
    if dropped:
        line += f"; {dropped:,} left out (no assistant message fits in a row)"
    return line


def _iters_per_epoch(train: ChatBatches, cfg: ModelConfig, accum: int, info: dist.DistInfo) -> int:
    return max(1, math.ceil(train.rows / (cfg.batch_size * accum * info.world_size)))


def _base_lr(ckpt: Checkpoint) -> float | None:
    """The peak learning rate the base was trained with (None: not recorded, e.g. imported)."""
    lr = (ckpt.training_state.get("train_config") or {}).get("learning_rate")
    ok = isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < math.inf
    return float(lr) if ok else None


def _defaults(train: ChatBatches, val: ChatBatches, cfg: ModelConfig, flags: dict[str, Any], epochs: int | None,
              info: dist.DistInfo, base_lr: float | None) -> dict[str, Any]:
    """A new fine-tune's defaults, from the data and the base (printed; the flags override them)."""
    per_epoch = _iters_per_epoch(train, cfg, flags.get("grad_accum_steps", 1), info)
    max_iters = flags.get("max_iters", (epochs or DEFAULT_EPOCHS) * per_epoch)
    factor = LORA_LR_FACTOR if cfg.lora is not None else 1
    lr = float(f"{(DEFAULTS['learning_rate'] if base_lr is None else base_lr * LR_FRACTION) * factor:.3g}")
    values = {**DEFAULTS, "learning_rate": lr, "max_iters": max_iters, "warmup_iters": min(100, max_iters // 20),
              "eval_interval": max(1, math.ceil(max_iters / 8)), "log_interval": max(1, min(10, max_iters // 20)),
              "eval_iters": max(1, min(100, math.ceil(val.rows / (cfg.batch_size * info.world_size))))}
    why = {"learning_rate": "the base records none" if base_lr is None else f"a tenth of the base's {base_lr:g}"}
    if factor != 1:
        why["learning_rate"] += f", times {factor} for LoRA"
    shown = [f"{k} {v:g}" + (f" ({why[k]})" if k in why else "") for k, v in values.items()
             if k != "max_iters" and k not in flags]
    length = (f"--max_iters {max_iters}" if "max_iters" in flags else
              f"{epochs or DEFAULT_EPOCHS} epoch(s) of {train.rows:,} rows = {max_iters} iterations")
    dist.print0(f"fine-tuning for {length}; defaults: {', '.join(shown)} (flags override them)")
    return values


# ---------------------------------------------------------------------------------------------
# The trainer on packed conversations


class SFTTrainer(Trainer):
    """The Trainer, with batches of packed conversations (their masked targets) and, in each
    progress line, the share of the targets trained on since the last one."""

    counting = False
    trained = 0
    targets = 0

    def _batch(self, data: Any, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels = data.windows(self.batch_size, seed, index)
        if self.counting:
            self.trained += int(np.count_nonzero(labels[:, 1:] >= 0))
            self.targets += labels[:, 1:].size
        return to_device(tokens, labels, self.device)

    def train_step(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.counting = True  # evaluation draws batches too: they are not counted
        try:
            return super().train_step(it)
        finally:
            self.counting = False

    def fit(self, state: TrainState, save: Any, on_eval: Any, progress: Any) -> Stop:
        return super().fit(state, save, on_eval, _TrainedShare(progress, self))


class _TrainedShare:
    """Adds "trained" (the share of targets the loss counted since the last line) to each progress row."""

    def __init__(self, progress: Any, trainer: SFTTrainer) -> None:
        self.progress, self.trainer = progress, trainer

    def log(self, row: dict[str, Any]) -> None:
        t = self.trainer
        row["trained"] = t.trained / max(1, t.targets)
        t.trained = t.targets = 0
        self.progress.log(row)

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        self.progress.eval(iteration, losses)
