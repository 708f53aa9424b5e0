"""One training run, new or resumed: decide the configs, build the objects, call the Trainer.

Everything the user gave is checked before anything is written. Owns the resume rules of the
spec: the saved config.json and tokenizer.json win, the saved input file is reused (a changed
one needs --allow_data_change), saved training flags are the defaults for the new run.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mypt import __version__, dist
from mypt.checkpoint import TrainingLock, checkpoint_dir, load_checkpoint, recover, save_checkpoint
from mypt.config import (
    GPT2_VOCAB_SIZE,
    ModelConfig,
    TrainConfig,
    apply_arch_flags,
    load_model_config,
    new_run_train_config,
)
from mypt.corpus import BUILTIN_CORPUS, builtin_corpus_path
from mypt.data import (
    TokenFile,
    char_vocab_of_file,
    check_input_file,
    check_long_enough,
    file_sha256,
    load_splits,
    prepare_tokens,
    training_text,
    training_text_end,
)
from mypt.errors import MyPTError
from mypt.metrics import MetricsWriter, Progress
from mypt.model import GPT
from mypt.tokenizers import (
    KNOWN_KINDS,
    BPETokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
    train_bpe,
)
from mypt.tokenizers.bpe import check_vocab_size
from mypt.trainer import Stop, Trainer, TrainState, make_optimizer

CACHE_DIR = ".cache"
DEFAULT_BPE_VOCAB = 4096


@dataclass
class RunPlan:
    """Everything decided before training starts."""

    ckpt_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    input_path: Path
    input_label: str  # what training_state.json records: a path, or the built-in corpus name
    input_sha256: str
    state: TrainState
    resume: Any  # the loaded Checkpoint, or None for a new model
    tokenizer_text_end: int | None = None  # a bpe tokenizer trained for this run saw the bytes before this


def train(*, model_name: str, checkpoints_dir: Path, config_file: str | None, input_file: str | None,
          tokenizer: str | None, arch_flags: dict[str, Any], train_flags: dict[str, Any], device: str,
          allow_data_change: bool = False, fsdp: bool = False, vocab_size: int | None = None) -> Stop:
    info = dist.dist_info()
    ckpt_dir = dist.same_on_every_rank(lambda: checkpoint_dir(checkpoints_dir, model_name))
    dist.same_on_every_rank(lambda: TrainConfig(**train_flags))  # flag errors first, before any file is read
    lock = TrainingLock(ckpt_dir)  # rank 0 holds it from before reading the checkpoint to the end

    def make_plan() -> RunPlan:
        if ckpt_dir.parent.is_dir():  # else nothing to read yet: it is taken before training starts
            lock.acquire()  # so a running trainer cannot swap the checkpoint while it is read
        recover(ckpt_dir)
        if (ckpt_dir / "config.json").exists():
            plan = plan_resume(ckpt_dir, config_file, input_file, tokenizer, arch_flags, train_flags,
                               allow_data_change, vocab_size)
        else:
            plan = plan_new(ckpt_dir, config_file, input_file, tokenizer, arch_flags, train_flags, vocab_size)
        tc = plan.train_cfg
        check_long_enough(plan.input_path, plan.tokenizer, tc.val_split, plan.model_cfg.block_size, plan.input_label)
        _fit_world_size(plan, info.world_size, "grad_accum_steps" in train_flags)
        return plan

    torch_device = dist.pick_device(device, info)
    with dist.process_group(info, torch_device), contextlib.ExitStack() as cleanup:
        cleanup.callback(lock.release)
        plan = dist.from_main(make_plan, share=_for_other_ranks)  # rank 0 reads the files
        tc = plan.train_cfg
        if plan.state.iteration >= tc.max_iters:
            dist.print0(f"'{model_name}' is already trained to iteration {plan.state.iteration}; "
                        f"nothing to do (pass a --max_iters above {plan.state.iteration} to train further)")
            return Stop()
        dtype = dist.pick_dtype(tc.dtype, torch_device)
        if tc.compile:
            dist.check_compile(torch_device)
        if info.is_main and not lock.held:
            lock.acquire()
        return _run(plan, info, torch_device, dtype, fsdp)


def _for_other_ranks(plan: RunPlan) -> RunPlan:
    """The plan without the weights and optimizer state: the other ranks get those by broadcast."""
    if plan.resume is None:
        return plan
    scaler = plan.resume.optimizer_state.get("scaler")
    resume = replace(plan.resume, model_state={}, optimizer_state={"scaler": scaler})
    return replace(plan, resume=resume)


def plan_new(ckpt_dir: Path, config_file: str | None, input_file: str | None, tokenizer: str | None,
             arch_flags: dict[str, Any], train_flags: dict[str, Any], vocab_size: int | None = None) -> RunPlan:
    _check_folders(ckpt_dir)
    base = load_model_config(config_file) if config_file else None
    cfg, warnings = apply_arch_flags(base, arch_flags, config_file)
    for w in warnings:
        dist.print0(f"warning: {w}")
    tc, used = new_run_train_config(cfg, train_flags)
    if used:
        dist.print0(f"training settings from {config_file}: " + ", ".join(f"{k} {v}" for k, v in used.items()))
    _check_vocab_flag(tokenizer, vocab_size)
    if input_file is None:
        path, label = builtin_corpus_path(ckpt_dir.parent / CACHE_DIR), BUILTIN_CORPUS
        dist.print0(f"no --input_file given: training on the built-in corpus ({BUILTIN_CORPUS})")
    else:
        path, label = check_input_file(Path(input_file)), input_file
    tok, text_end = _new_tokenizer(tokenizer or "gpt2", vocab_size, path, label, tc.val_split)
    cfg = _model_vocab(cfg, tok, config_file, label)
    return RunPlan(ckpt_dir, cfg, tc, tok, path, label, file_sha256(path), TrainState(), None, text_end)


def _check_vocab_flag(tokenizer: str | None, vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    if tokenizer != "bpe":
        raise MyPTError(f"--vocab_size {vocab_size} sets the size of a new bpe tokenizer: use it with --tokenizer "
                        "bpe (gpt2 has 50257 tokens, char the characters of the text, a tokenizer file its own)")
    check_vocab_size(vocab_size)


def _new_tokenizer(choice: str, vocab_size: int | None, path: Path, label: str,
                   val_split: float) -> tuple[Tokenizer, int | None]:
    """The tokenizer of a new run, and where the text a bpe one was trained on ends (else None)."""
    if choice == "gpt2":
        return build_tokenizer("gpt2"), None
    if choice == "char":
        return build_tokenizer("char", "".join(char_vocab_of_file(path))), None
    if choice == "bpe":
        n = vocab_size or DEFAULT_BPE_VOCAB
        dist.print0(f"training a bpe tokenizer of {n} tokens on the text of {label} before its last "
                    f"{val_split:g} (the validation part)")
        start = time.perf_counter()
        tok = train_bpe(training_text(path, val_split), n,
                        f"the training part of {label} (the text before its last --val_split {val_split:g})")
        dist.print0(f"bpe tokenizer trained in {time.perf_counter() - start:.1f} s ({tok.id_string()})")
        return tok, training_text_end(path, val_split)
    return tokenizer_file(choice), None


def tokenizer_file(path: str) -> Tokenizer:
    """The tokenizer saved in the file `path` (--tokenizer FILE.json)."""
    if not Path(path).exists():
        known = ", ".join(KNOWN_KINDS)
        raise MyPTError(f"--tokenizer {path}: no such file; pass one of {known}, or a tokenizer .json file "
                        "(mypt tokenizer train writes one)")
    return load_tokenizer(path)


def _model_vocab(cfg: ModelConfig, tok: Tokenizer, config_file: str | None, label: str) -> ModelConfig:
    """The config with the vocab_size the tokenizer needs (gpt2: the preset's, if large enough)."""
    if tok.kind == "gpt2":
        if cfg.vocab_size < tok.n_vocab:
            raise MyPTError(f"{config_file or '--vocab_size'}: vocab_size ({cfg.vocab_size}) is smaller than "
                            f"the gpt2 tokenizer's {tok.n_vocab} tokens; use {GPT2_VOCAB_SIZE} or --tokenizer char")
        return cfg
    size = tok.model_vocab_size()
    if cfg.vocab_size != size:
        why = (f"the characters of {label} and end-of-text" if tok.kind == "char"
               else f"its {tok.n_vocab} tokens padded to a multiple of 64")
        dist.print0(f"{tok.kind} tokenizer: vocab_size is {size} ({why}), not the config's {cfg.vocab_size}")
        cfg = _replace(cfg, vocab_size=size)
    return cfg


def _check_folders(ckpt_dir: Path) -> None:
    """The model's folder, and the nearest existing folder above it, must not be files."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    for folder in ckpt_dir.parents:
        if folder.exists():
            if not folder.is_dir():
                raise MyPTError(f"--checkpoints_dir {ckpt_dir.parent}: {folder} is not a folder; "
                                "pass a folder (it is created if missing)")
            return


def plan_resume(ckpt_dir: Path, config_file: str | None, input_file: str | None, tokenizer: str | None,
                arch_flags: dict[str, Any], train_flags: dict[str, Any], allow_data_change: bool,
                vocab_size: int | None = None) -> RunPlan:
    ckpt = load_checkpoint(ckpt_dir, with_optimizer=True)
    saved_src = f"{ckpt_dir}/config.json"
    cfg = ModelConfig.from_dict(ckpt.config, saved_src)
    ts = ckpt.training_state
    if config_file:
        other = load_model_config(config_file)
        if other.arch_dict() | {"batch_size": other.batch_size} != cfg.arch_dict() | {"batch_size": cfg.batch_size}:
            dist.print0(f"warning: --config_file {config_file} ignored: resuming '{ckpt_dir.name}' "
                        f"uses its saved {saved_src}")
    cfg, warnings = apply_arch_flags(cfg, arch_flags, saved_src)
    for w in warnings:
        dist.print0(f"warning: {w}")
    tok = tokenizer_from_json(ckpt.tokenizer, f"{ckpt_dir}/tokenizer.json")
    _warn_ignored_tokenizer(tokenizer, vocab_size, tok, ckpt_dir.name)
    tc = TrainConfig(**{**ts.get("train_config", {}), **train_flags})
    path, label, sha = _resume_input(ckpt_dir, ts, input_file, allow_data_change)
    state = TrainState(**{k: ts[k] for k in TrainState().to_dict() if k in ts})
    dist.print0(f"resuming '{ckpt_dir.name}' from iteration {state.iteration}")
    return RunPlan(ckpt_dir, cfg, tc, tok, path, label, sha, state, ckpt)


def _warn_ignored_tokenizer(choice: str | None, vocab_size: int | None, saved: Tokenizer, name: str) -> None:
    """On resume the saved tokenizer wins: a --tokenizer or --vocab_size that differs gets a warning."""
    if choice in KNOWN_KINDS:
        differs = choice != saved.kind or (vocab_size is not None and vocab_size != saved.n_vocab)
    else:
        differs = choice is not None and tokenizer_file(choice).id_string() != saved.id_string()
    if differs:
        flags = f"--tokenizer {choice}" + (f" --vocab_size {vocab_size}" if vocab_size is not None else "")
        dist.print0(f"warning: {flags} ignored: '{name}' uses its saved {saved.kind} tokenizer "
                    f"({saved.n_vocab:,} tokens)")
    elif choice is None and vocab_size is not None:
        dist.print0(f"warning: --vocab_size {vocab_size} ignored: '{name}' uses its saved {saved.kind} tokenizer")


def _resume_input(ckpt_dir: Path, ts: dict[str, Any], input_file: str | None,
                  allow_change: bool) -> tuple[Path, str, str]:
    saved_label, saved_sha = ts.get("input_file"), ts.get("input_sha256")
    if input_file is None:
        if saved_label == BUILTIN_CORPUS:
            path = builtin_corpus_path(ckpt_dir.parent / CACHE_DIR)
            return path, saved_label, file_sha256(path)
        if saved_label is None:
            raise MyPTError(f"'{ckpt_dir.name}' has no saved input file (it was imported, not trained by MyPT); "
                            "pass --input_file to fine-tune it")
        if not Path(saved_label).exists():
            raise MyPTError(f"'{ckpt_dir.name}' was trained on {saved_label}, which no longer exists; "
                            "pass --input_file (and --allow_data_change if its content differs)")
        input_file = saved_label
    path = check_input_file(Path(input_file))
    sha = file_sha256(path)
    if saved_sha and sha != saved_sha and not allow_change:
        raise MyPTError(f"--input_file {input_file}: its content differs from the text '{ckpt_dir.name}' was "
                        f"trained on ({saved_label}); pass --allow_data_change to continue on the new text")
    return path, input_file, sha


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), **changes}, "config")


def _run(plan: RunPlan, info: dist.DistInfo, device: torch.device, dtype: str, fsdp: bool) -> Stop:
    cfg, tc = plan.model_cfg, plan.train_cfg
    train_data, val_data = load_splits(_token_file(plan, info), tc.val_split, cfg.block_size, plan.input_label)
    dist.same_on_every_rank(lambda: _check_tokenizer_text(plan, train_data))

    torch.manual_seed(tc.seed)
    model = GPT(cfg).to(device)
    model.gradient_checkpointing = tc.gradient_checkpointing
    if plan.resume is not None and info.is_main:  # the other ranks get rank 0's weights from wrap_model
        model.load_state_dict(plan.resume.model_state)
    wrapped = dist.wrap_model(model, info, device, fsdp)
    optimizer = make_optimizer(wrapped, tc, device)
    if plan.resume is not None:
        dist.load_optimizer_state(wrapped, optimizer, plan.resume.optimizer_state.get("optimizer"))
    runnable = torch.compile(wrapped) if tc.compile else wrapped
    trainer = Trainer(runnable, optimizer, train_data, val_data, cfg.block_size, cfg.batch_size, tc,
                      device, dtype, info)
    if plan.resume is not None and plan.resume.optimizer_state.get("scaler"):
        trainer.scaler.load_state_dict(plan.resume.optimizer_state["scaler"])

    dist.print0(f"model: {model.num_params():,} parameters, {cfg.n_layer} layers, {cfg.n_embd} wide; "
                f"device {device}, {dtype}; {trainer.tokens_per_iter:,} tokens per iteration "
                f"({cfg.batch_size} x {cfg.block_size} x {tc.grad_accum_steps} accum x {info.world_size} processes)")
    metrics = MetricsWriter(plan.ckpt_dir, tc.tensorboard and info.is_main, plan.state.iteration)
    progress = Progress(plan.state.iteration, tc.max_iters, enabled=info.is_main)

    def save(state: TrainState) -> None:
        model_state, optim_state = dist.full_state_dicts(wrapped, optimizer)
        if info.is_main:
            save_checkpoint(
                plan.ckpt_dir, model_state=model_state, config=cfg.to_dict(),
                tokenizer=plan.tokenizer.to_json(), training_state=_training_state(plan, tc, state, info),
                optimizer_state={"optimizer": optim_state, "scaler": trainer.scaler.state_dict()},
            )
        dist.barrier()

    def on_eval(state: TrainState, row: dict[str, Any]) -> None:
        if info.is_main:
            metrics.eval_row(row)

    try:
        stop = trainer.fit(plan.state, save, on_eval, _Reporter(progress, metrics, info.is_main))
    finally:
        progress.close()
        metrics.close()
    if stop.signum is not None:
        launcher = f"torchrun --nproc_per_node={info.local_world_size}" if info.enabled else "python"
        dist.print0(f"stopped by signal at iteration {plan.state.iteration}; checkpoint saved. Resume with:\n"
                    f"  {launcher} train.py --model_name {plan.ckpt_dir.name} --checkpoints_dir {plan.ckpt_dir.parent}"
                    + (" --fsdp" if fsdp else ""))
    else:
        dist.print0(f"done: iteration {plan.state.iteration}, val loss {plan.state.last_val_loss:.4f}; "
                    f"saved to {plan.ckpt_dir}/")
    return stop


def _token_file(plan: RunPlan, info: dist.DistInfo) -> TokenFile:
    """Rank 0 tokenizes first; the other ranks then find its cache, or, on a machine that does not
    share rank 0's disk, tokenize the same text at the same path there."""
    cache = plan.ckpt_dir.parent / CACHE_DIR
    token_file = prepare_tokens(plan.input_path, plan.tokenizer, cache) if info.is_main else None
    dist.barrier()
    if token_file is not None:
        return token_file
    path = builtin_corpus_path(cache) if plan.input_label == BUILTIN_CORPUS else plan.input_path
    token_file = prepare_tokens(path, plan.tokenizer, cache, progress=False)
    if token_file.sha256 != plan.input_sha256:
        raise MyPTError(f"process {info.rank}: {path} on this machine differs from the text rank 0 trains on; "
                        "copy rank 0's file here (or put it on a shared filesystem)")
    return token_file


def _check_tokenizer_text(plan: RunPlan, train_data: Any) -> None:
    """A bpe tokenizer trained for this run must have seen no validation text: the training
    tokens must cover at least the bytes it was trained on (data.training_text_end)."""
    tok = plan.tokenizer
    if plan.tokenizer_text_end is None or not isinstance(tok, BPETokenizer):
        return
    lengths, covered, step = tok.byte_lengths(), 0, 1 << 24
    for start in range(0, len(train_data), step):
        covered += int(lengths[train_data[start:start + step]].sum())
    if covered < plan.tokenizer_text_end:
        raise MyPTError(f"{plan.input_label}: validation starts at byte {covered:,}, before the end of the text "
                        f"the bpe tokenizer was trained on (byte {plan.tokenizer_text_end:,}): the end of the "
                        "text tokenizes much more compactly than the rest. Train the tokenizer on a text of your "
                        "choice (mypt tokenizer train) and pass --tokenizer FILE.json")


class _Reporter:
    """What the trainer reports to: the terminal, and TensorBoard's per-log scalars on rank 0."""

    def __init__(self, progress: Progress, metrics: MetricsWriter, is_main: bool) -> None:
        self.progress, self.metrics, self.is_main = progress, metrics, is_main

    def log(self, row: dict[str, Any]) -> None:
        self.progress.log(row)
        if self.is_main:
            self.metrics.train_row(row)

    def eval(self, iteration: int, losses: dict[str, float]) -> None:
        self.progress.eval(iteration, losses)


def _fit_world_size(plan: RunPlan, world_size: int, accum_given: bool) -> None:
    """Keep the global batch when a run resumes with a different number of processes.

    An explicit --grad_accum_steps is used as given (the global batch then changes, by choice).
    """
    if plan.resume is None:
        return
    tc = plan.train_cfg
    saved_world = plan.resume.training_state.get("world_size", 1)
    if saved_world == world_size or accum_given:
        return
    global_micro = saved_world * tc.grad_accum_steps
    if global_micro % world_size:
        raise MyPTError(f"'{plan.ckpt_dir.name}' was trained with {saved_world} processes x {tc.grad_accum_steps} "
                        f"accumulation steps; {world_size} processes cannot keep that global batch. "
                        f"Use a process count that divides {global_micro}, or pass --grad_accum_steps")
    new_accum = global_micro // world_size
    dist.print0(f"note: resuming with {world_size} process(es) instead of {saved_world}: "
                f"--grad_accum_steps {new_accum} keeps the global batch")
    plan.train_cfg = TrainConfig(**{**tc.to_dict(), "grad_accum_steps": new_accum})


def _training_state(plan: RunPlan, tc: TrainConfig, state: TrainState, info: dist.DistInfo) -> dict[str, Any]:
    return {
        **state.to_dict(),
        "model_name": plan.ckpt_dir.name,
        "train_config": tc.to_dict(),
        "world_size": info.world_size,
        "input_file": plan.input_label,
        "input_sha256": plan.input_sha256,
        "tokenizer": plan.tokenizer.kind,
        "versions": {"mypt": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

