"""One training run, new or resumed: decide the configs, build the objects, call the Trainer.

Everything the user gave is checked before anything is written. Owns the resume rules of the
spec: the saved config.json and tokenizer.json win, the saved training data are reused (changed
data need --allow_data_change), saved training flags are the defaults for the new run.

Rank 0 makes the plan in one order, for every tokenizer: the configs; the split (decided on the
text, data.TrainingText); the tokenizer (saved, loaded, or made from the text: a char one from
its characters, a bpe one trained on its training split); the model's vocabulary and the memory
check; the data, prepared once into the token cache and opened. Then every rank trains.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mypt import data, dist
from mypt.build import build_model, check_weights_fit, checkpoint_tokenizer, new_model
from mypt.checkpoint import (
    SAVED,
    checkpoint_dir,
    folder_state,
    load_checkpoint,
    now,
    real_folder,
    recover,
    save_checkpoint,
    training_lock,
    versions,
)
from mypt.config import (
    GPT2_VOCAB_SIZE,
    ModelConfig,
    TrainConfig,
    apply_arch_flags,
    check_train_flags,
    load_model_config,
    new_run_train_config,
    resume_train_config,
    saved_train_config,
)
from mypt.data.builtin import DEFAULT as BUILTIN_CORPUS
from mypt.errors import MyPTError
from mypt.estimate import detect_memory, estimate_memory, human_bytes, max_batch_size
from mypt.evaluation.report import check_tasks, task_scores
from mypt.evaluation.tasks import Task, load_tasks
from mypt.fsutil import FileLock
from mypt.metrics import MetricsWriter, Progress, read_metrics
from mypt.model import GPT
from mypt.optim import check_optimizer, make_optimizer, saved_optimizer
from mypt.tokenizers import (
    KNOWN_KINDS,
    CharTokenizer,
    Tokenizer,
    tokenizer_file,
    tokenizer_for,
    train_bpe,
)
from mypt.tokenizers.bpe import check_vocab_size
from mypt.trainer import Stop, Trainer, TrainState, get_lr

DEFAULT_BPE_VOCAB = 4096


@dataclass
class RunPlan:
    """Everything decided before training starts."""

    ckpt_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer | None  # None until a new char or bpe tokenizer is made from the text
    sources: list[data.Source]
    state: TrainState
    resume: Any  # the loaded Checkpoint, or None for a new model
    expect_sha256: str | None = None  # a resume: the recorded content hash of its data
    corpus: data.Corpus | None = None  # the training data, prepared (rank 0's manifests)
    splits: Any = None  # rank 0's (train, val) streams, opened while planning; not sent to other ranks
    new_tokenizer: str | None = None  # a new model's "char" or "bpe": made from the text
    bpe_vocab: int | None = None  # a new bpe tokenizer's size
    config_file: str | None = None  # a new model's --config_file
    # A fine-tune (mypt.finetune.run) sets these: its resume is the base's weights when new, its
    # splits are packed conversations, its data are not a prepared corpus.
    trainer: type[Trainer] = Trainer
    data_state: dict[str, Any] | None = None  # training_state.json's data fields (None: the corpus')
    command: str = "train.py"  # what resumes the run, after "python " or "torchrun ... "


def train(*, model_name: str, checkpoints_dir: Path, config_file: str | None, input_files: list[str] | None,
          tokenizer: str | None, arch_flags: dict[str, Any], train_flags: dict[str, Any], device: str,
          allow_data_change: bool = False, fsdp: bool = False, skip_memory_check: bool = False,
          text_field: str | None = None, data_file: str | None = None, vocab_size: int | None = None,
          eval_tasks: list[str] | None = None) -> Stop:
    info = dist.dist_info()
    tasks = dist.same_on_every_rank(lambda: load_eval_tasks(eval_tasks, fsdp))
    ckpt_dir = dist.same_on_every_rank(lambda: checkpoint_dir(checkpoints_dir, model_name))
    dist.same_on_every_rank(lambda: check_train_flags(train_flags))  # flag errors first, before any file is read
    sources = dist.same_on_every_rank(lambda: data.sources_from_flags(input_files, text_field, data_file))
    torch_device = dist.pick_device(device, info)
    locks: list[FileLock] = []  # rank 0 holds the model's lock from before reading the checkpoint to the end

    def make_plan() -> RunPlan:
        check_folders(ckpt_dir)
        if ckpt_dir.parent.is_dir():  # else nothing to read yet: it is taken before training starts
            locks.append(training_lock(ckpt_dir))
            locks[0].acquire()  # so no other trainer swaps the checkpoint while it is read
            recover(ckpt_dir)  # only the lock holder may repair a killed save
        if folder_state(ckpt_dir) == SAVED:  # a folder with anything else in it is refused, never trained over
            plan = plan_resume(ckpt_dir, config_file, sources, tokenizer, arch_flags, train_flags,
                               allow_data_change, vocab_size)
        else:
            plan = plan_new(ckpt_dir, config_file, sources, tokenizer, arch_flags, train_flags, vocab_size)
        tc = plan.train_cfg
        if plan.state.iteration >= tc.max_iters:
            return plan
        dtype = dist.pick_dtype(tc.dtype, torch_device)  # flags that stop the run: before data are written
        if tc.compile:
            dist.check_compile(torch_device)
        fit_world_size(plan, info.world_size, "grad_accum_steps" in train_flags)
        saved = saved_optimizer(plan.resume.training_state) if plan.resume else None
        check_optimizer(plan.train_cfg, fsdp, saved, given=train_flags)

        text = data.TrainingText(plan.sources, _cache(ckpt_dir), tc.val_split)  # 1. the split, on the text
        if plan.tokenizer is None:  # 2. the tokenizer: saved or loaded, else made from the text
            plan.tokenizer = _new_tokenizer(plan, text)
        if plan.resume is None:  # 3. the model: a new one's vocabulary, then its memory
            plan.model_cfg = _model_vocab(plan.model_cfg, plan.tokenizer, plan.config_file)
        if skip_memory_check:  # weights alone beyond the device's memory could never run all the same
            check_weights_fit(plan.model_cfg, torch_device)
        else:
            check_memory(plan.model_cfg, tc, dtype, torch_device, info, fsdp)
        _prepare_data(plan, allow_data_change)  # 4. the data: prepared once, opened
        return plan

    with dist.process_group(info, torch_device), contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [lock.release() for lock in locks])
        plan = dist.from_main(make_plan, share=for_other_ranks)  # rank 0 reads the files
        tc = plan.train_cfg
        if plan.state.iteration >= tc.max_iters:
            dist.print0(f"'{model_name}' is already trained to iteration {plan.state.iteration}; "
                        f"nothing to do (pass a --max_iters above {plan.state.iteration} to train further)")
            return Stop()
        dtype = dist.pick_dtype(tc.dtype, torch_device)
        if tc.compile:
            dist.check_compile(torch_device)
        if info.is_main and not locks:
            locks.append(training_lock(ckpt_dir))
            locks[0].acquire()
        return run_plan(plan, info, torch_device, dtype, fsdp, tasks)


def check_memory(cfg: ModelConfig, tc: TrainConfig, dtype: str, device: torch.device, info: dist.DistInfo,
                 fsdp: bool) -> None:
    """Refuse, before anything is allocated, a run whose estimated peak memory exceeds the device's."""
    precision = "fp32" if dtype == "fp32" else "bf16"
    need = estimate_memory(cfg, cfg.batch_size, precision, tc.gradient_checkpointing, optimizer=tc.optimizer)
    total, where = detect_memory(device)
    share = info.local_world_size if device.type == "cpu" else 1  # processes on one machine share its RAM
    states = need.weights + need.gradients + need.optimizer
    per_process = need.total - (states - states // info.world_size if fsdp else 0)
    if per_process * share <= total:
        return
    fits = max_batch_size(cfg, total // share, precision, tc.gradient_checkpointing, tc.optimizer)
    advice = (f"the largest batch_size that fits is {fits}" if fits else
              "no batch size fits: use a smaller config (fewer or narrower layers)")
    many = f" x {share} processes" if share > 1 else ""
    raise MyPTError(
        f"this run needs about {human_bytes(per_process)}{many} at its peak ({precision}, batch_size "
        f"{cfg.batch_size}, block_size {cfg.block_size}, {cfg.n_layer} layers x {cfg.n_embd}: weights "
        f"{human_bytes(need.weights)}, gradients {human_bytes(need.gradients)}, optimizer "
        f"{human_bytes(need.optimizer)}, activations {human_bytes(need.activations)}), but {where} has "
        f"{human_bytes(total)}; {advice} (or try --gradient_checkpointing). Pass --skip_memory_check to "
        "start anyway")


def for_other_ranks(plan: RunPlan) -> RunPlan:
    """The plan without the weights and optimizer state: the other ranks get those by broadcast."""
    if plan.resume is None:
        return replace(plan, splits=None)
    scaler = (plan.resume.optimizer_state or {}).get("scaler")
    resume = replace(plan.resume, model_state={}, optimizer_state={"scaler": scaler})
    return replace(plan, resume=resume, splits=None)


def plan_new(ckpt_dir: Path, config_file: str | None, sources: list[data.Source] | None, tokenizer: str | None,
             arch_flags: dict[str, Any], train_flags: dict[str, Any], vocab_size: int | None = None) -> RunPlan:
    base = load_model_config(config_file) if config_file else None
    cfg, warnings = apply_arch_flags(base, arch_flags, config_file)
    for w in warnings:
        dist.print0(f"warning: {w}")
    tc, used = new_run_train_config(cfg, train_flags)
    if used:
        dist.print0(f"training settings from {config_file}: " + ", ".join(f"{k} {v}" for k, v in used.items()))
    _check_vocab_flag(tokenizer, vocab_size)
    if sources is None:
        sources = [data.Source("input", (BUILTIN_CORPUS,))]
        dist.print0(f"no --input_file given: training on the built-in corpus ({BUILTIN_CORPUS})")
    plan = RunPlan(ckpt_dir, cfg, tc, None, sources, TrainState(), None, config_file=config_file)
    choice = tokenizer or "gpt2"
    if choice in ("char", "bpe"):  # made from the text once the split is known
        plan.new_tokenizer = choice
        plan.bpe_vocab = (vocab_size or DEFAULT_BPE_VOCAB) if choice == "bpe" else None
    else:
        plan.tokenizer = tokenizer_for(choice)
    return plan


def _check_vocab_flag(tokenizer: str | None, vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    if tokenizer != "bpe":
        raise MyPTError(f"--vocab_size {vocab_size} sets the size of a new bpe tokenizer: use it with --tokenizer "
                        "bpe (gpt2 has 50257 tokens, char the characters of the text, a tokenizer file its own)")
    check_vocab_size(vocab_size)


def _new_tokenizer(plan: RunPlan, text: data.TrainingText) -> Tokenizer:
    """A new model's char tokenizer (the characters of its whole text) or bpe tokenizer (trained on
    the training split only: validation text never reaches it)."""
    if plan.new_tokenizer == "char":
        return CharTokenizer(text.characters())
    assert plan.new_tokenizer == "bpe" and plan.bpe_vocab is not None
    what = f"the training part of {text.label()} (--val_split {plan.train_cfg.val_split:g} left out)"
    dist.print0(f"training a bpe tokenizer of {plan.bpe_vocab} tokens on {what}")
    start = time.perf_counter()
    tok = train_bpe(text, plan.bpe_vocab, what)
    dist.print0(f"bpe tokenizer trained in {time.perf_counter() - start:.1f} s on {text.describe()} "
                f"({tok.id_string()})")
    return tok


def _model_vocab(cfg: ModelConfig, tok: Tokenizer, config_file: str | None) -> ModelConfig:
    """The config with the vocab_size that the tokenizer needs; gpt2 keeps the preset's if it is
    large enough."""
    kind, n_vocab, size = tok.kind, tok.n_vocab, tok.model_vocab_size()
    if kind == "gpt2":
        if cfg.vocab_size < n_vocab:
            raise MyPTError(f"{config_file or '--vocab_size'}: vocab_size ({cfg.vocab_size}) is smaller than "
                            f"the gpt2 tokenizer's {n_vocab} tokens; use {GPT2_VOCAB_SIZE} or --tokenizer char")
        return cfg
    if cfg.vocab_size != size:
        why = ("the characters of the text, end-of-text and the chat tokens" if kind == "char" else
               f"its {n_vocab} tokens" + (" padded to a multiple of 64" if size > n_vocab else ""))
        dist.print0(f"{kind} tokenizer: vocab_size is {size} ({why}), not the config's {cfg.vocab_size}")
        cfg = _replace(cfg, vocab_size=size)
    return cfg


def _cache(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent / data.CACHE_DIR


def _prepare_data(plan: RunPlan, allow_change: bool) -> None:
    """Prepare the data with the run's tokenizer (rank 0; once, into the cache) and open the train /
    validation streams. Data a new run just prepared are removed again if it stops here (too short)."""
    try:
        plan.corpus = data.prepare_corpus(plan.sources, plan.tokenizer, _cache(plan.ckpt_dir),
                                          val_split=plan.train_cfg.val_split, expect_sha256=plan.expect_sha256,
                                          allow_change=allow_change)
    except data.DataChanged:
        saved = data.describe_sources(data.saved_sources(plan.resume.training_state)[0])
        what = ", ".join(i for s in plan.sources for i in s.inputs)
        raise MyPTError(f"--input_file {what}: its content differs from the text '{plan.ckpt_dir.name}' was "
                        f"trained on ({saved}); pass --allow_data_change to continue on the new text") from None
    try:
        train, val, lines = data.open_splits(plan.corpus, plan.tokenizer, plan.train_cfg.val_split,
                                             plan.model_cfg.block_size, _smaller_block(plan))
    except MyPTError:
        if plan.resume is None:
            plan.corpus.discard_created()
        raise
    for line in lines:
        dist.print0(f"data: {line}")
    plan.splits = (train, val)


def _smaller_block(plan: RunPlan) -> str | None:
    """How this run would get a smaller block_size (None: a resumed model keeps its own)."""
    if plan.resume is not None:
        return None
    size = plan.model_cfg.block_size
    if plan.config_file:
        return (f"a config file with a smaller block_size than {plan.config_file}'s {size} (--block_size "
                "does not override --config_file)")
    return f"a smaller --block_size (now {size})"


def check_folders(ckpt_dir: Path) -> None:
    """The model's folder (or the folder its link points to), and the nearest existing folder above
    it, must not be files."""
    real_folder(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise MyPTError(f"{ckpt_dir} is not a folder; move it away or pick another --model_name")
    for folder in ckpt_dir.parents:
        if folder.exists():
            if not folder.is_dir():
                raise MyPTError(f"--checkpoints_dir {ckpt_dir.parent}: {folder} is not a folder; "
                                "pass a folder (it is created if missing)")
            return


def plan_resume(ckpt_dir: Path, config_file: str | None, sources: list[data.Source] | None, tokenizer: str | None,
                arch_flags: dict[str, Any], train_flags: dict[str, Any], allow_data_change: bool,
                vocab_size: int | None = None) -> RunPlan:
    ckpt = load_checkpoint(ckpt_dir, with_optimizer=True)
    if "finetune" in ckpt.training_state:
        raise MyPTError(f"'{ckpt_dir.name}' is a chat fine-tune: resume it with mypt finetune --model_name "
                        f"{ckpt_dir.name} (train.py trains on text)")
    read_metrics(ckpt_dir)  # each evaluation rewrites it: one that is not a file is refused now
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
    tok = checkpoint_tokenizer(ckpt, cfg)
    _warn_ignored_tokenizer(tokenizer, vocab_size, tok, ckpt_dir.name)
    source = f"{ckpt_dir}/training_state.json"
    state = TrainState.from_saved(ts, source)
    saved = saved_train_config(ts, source)
    tc = resume_train_config(saved, train_flags)
    if tc.val_split != saved.get("val_split", tc.val_split) and not allow_data_change:
        raise MyPTError(f"--val_split {tc.val_split}: '{ckpt_dir.name}' was trained with --val_split "
                        f"{saved['val_split']}; another split would move validation text into training. Leave "
                        "--val_split out, or pass --allow_data_change to accept that")
    saved_sources, saved_sha = data.saved_sources(ts, source)
    dist.print0(f"resuming '{ckpt_dir.name}' from iteration {state.iteration}")
    dist.print0(schedule_note(tc, state.iteration, "lr_decay_iters" in train_flags))
    if not ckpt.has_optimizer:
        dist.print0(f"note: {ckpt_dir.name} has no optimizer.pt (imported or weights only): starting a fresh "
                    "optimizer")
    return RunPlan(ckpt_dir, cfg, tc, tok, sources or _saved_inputs(ckpt_dir, saved_sources), state, ckpt,
                   saved_sha)


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


def schedule_note(tc: TrainConfig, iteration: int, replanned: bool) -> str:
    how = "re-planned by --lr_decay_iters" if replanned else "as saved; pass --lr_decay_iters N to re-plan it"
    return (f"learning-rate schedule: cosine decay to {tc.final_lr:.2e} ends at iteration {tc.lr_decay_iters} "
            f"({how}); learning rate at iteration {iteration}: {get_lr(iteration, tc):.2e}")


def _saved_inputs(ckpt_dir: Path, saved: list[data.Source] | None) -> list[data.Source]:
    """The data a resumed run trains on when the command names none: the recorded ones."""
    if saved is None:
        raise MyPTError(f"'{ckpt_dir.name}' has no saved input file (it was imported, not trained by MyPT); "
                        "pass --input_file to fine-tune it")
    missing = data.missing_inputs(saved)
    if missing:
        raise MyPTError(f"'{ckpt_dir.name}' was trained on {missing}, which no longer exists; pass "
                        "--input_file (and --allow_data_change if its content differs)")
    return saved


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), **changes}, "config")


def load_eval_tasks(specs: list[str] | None, fsdp: bool) -> list[Task]:
    """The --eval_task tasks, read before anything else happens."""
    if specs and fsdp:
        raise MyPTError("--eval_task does not run with --fsdp (each process holds a shard of the model); evaluate "
                        "the saved checkpoints with mypt eval --task instead")
    return [task for spec in specs or [] for task in load_tasks(spec)]


def run_plan(plan: RunPlan, info: dist.DistInfo, device: torch.device, dtype: str, fsdp: bool,
             tasks: list[Task] | None = None) -> Stop:
    """Train the planned run; at each evaluation the main process also scores `tasks` (--eval_task)."""
    cfg, tc = plan.model_cfg, plan.train_cfg
    tasks = tasks or []
    check_tasks(plan.tokenizer, tasks)
    train_data, val_data = _splits(plan, info)
    model, wrapped = build_for_training(plan, info, device, fsdp)
    optimizer = make_optimizer(wrapped, tc, device)
    saved = (plan.resume.optimizer_state or {}) if plan.resume is not None else {}
    if plan.resume is not None and plan.resume.has_optimizer:
        dist.load_optimizer_state(wrapped, optimizer, saved.get("optimizer"))
    runnable = torch.compile(wrapped) if tc.compile else wrapped
    trainer = plan.trainer(runnable, optimizer, train_data, val_data, cfg.block_size, cfg.batch_size, tc,
                           device, dtype, info)
    if saved.get("scaler"):
        trainer.scaler.load_state_dict(saved["scaler"])

    dist.print0(f"model: {model.num_params():,} parameters, {cfg.n_layer} layers, {cfg.n_embd} wide; "
                f"device {device}, {dtype}; {trainer.tokens_per_iter:,} tokens per iteration "
                f"({cfg.batch_size} x {cfg.block_size} x {tc.grad_accum_steps} accum x {info.world_size} processes)")
    metrics = MetricsWriter(plan.ckpt_dir, tc.tensorboard and info.is_main, plan.state.iteration)
    progress = Progress(plan.state.iteration, tc.max_iters, enabled=info.is_main)

    def save(state: TrainState, best: bool) -> None:
        model_state, optim_state = dist.full_state_dicts(wrapped, optimizer)
        keep = bool(tc.keep_every) and state.iteration % tc.keep_every == 0  # the trainer saves at each multiple
        if info.is_main:
            save_checkpoint(
                plan.ckpt_dir, model_state=model_state, config=cfg.to_dict(),
                tokenizer=plan.tokenizer.to_json(), training_state=_training_state(plan, tc, state, info),
                optimizer_state={"optimizer": optim_state, "scaler": trainer.scaler.state_dict()},
                best=best and tc.keep_best, keep=keep,
            )
        dist.barrier()

    def on_eval(state: TrainState, row: dict[str, Any]) -> None:
        if info.is_main:
            scores = task_scores(model, plan.tokenizer, tasks, device, dtype)
            if scores:
                print(f"tasks at iter {row['iter']}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                      flush=True)
            metrics.eval_row({**row, **scores})

    try:
        stop = trainer.fit(plan.state, save, on_eval, _Reporter(progress, metrics, info.is_main))
    finally:
        progress.close()
        metrics.close()
    if stop.signum is not None:
        launcher = f"torchrun --nproc_per_node={info.local_world_size}" if info.enabled else "python"
        dist.print0(f"stopped by signal at iteration {plan.state.iteration}; checkpoint saved. Resume with:\n"
                    f"  {launcher} {plan.command} --model_name {plan.ckpt_dir.name} "
                    f"--checkpoints_dir {plan.ckpt_dir.parent}"
                    + (" --fsdp" if fsdp else ""))
    else:
        dist.print0(f"done: iteration {plan.state.iteration}, val loss {plan.state.last_val_loss:.4f}; "
                    f"saved to {plan.ckpt_dir}/")
    return stop


def build_for_training(plan: RunPlan, info: dist.DistInfo, device: torch.device,
                       fsdp: bool) -> tuple[GPT, torch.nn.Module]:
    """The model to train and its wrapped form (DDP or FSDP), holding the resumed weights (rank 0
    reads them; the other ranks get them from it) or a new model's, drawn under the run's seed.

    With --fsdp no rank ever holds the whole model: it is built on the meta device and sharded
    before any weight exists (dist.sharded_model), with the weights of the unsharded build.
    """
    cfg, tc = plan.model_cfg, plan.train_cfg
    if fsdp:
        if plan.resume is not None and info.is_main:
            build_model(plan.resume, "meta")  # the weights' names and shapes checked against config.json
        torch.manual_seed(tc.seed)
        with torch.device("meta"):
            model = GPT(cfg)
        weights = None if plan.resume is None else plan.resume.model_state  # {} but on rank 0
        wrapped = model = dist.sharded_model(model, info, device, weights)
    else:
        if plan.resume is not None and info.is_main:  # the other ranks get rank 0's weights from DDP
            model = build_model(plan.resume, device).model
        else:
            torch.manual_seed(tc.seed)
            model = new_model(cfg, device)
        wrapped = dist.wrap_model(model, info, device)
    model.gradient_checkpointing = tc.gradient_checkpointing
    return model, wrapped


def _splits(plan: RunPlan, info: dist.DistInfo) -> tuple[data.Mixture, data.Mixture]:
    """Rank 0 opened its streams while planning. The other ranks find rank 0's prepared data, or,
    on a machine that does not share rank 0's disk, prepare the same inputs at the same paths
    there; different content stops the run."""
    if plan.splits is not None:
        return plan.splits
    corpus = data.prepare_corpus([p.source for p in plan.corpus.parts], plan.tokenizer, _cache(plan.ckpt_dir),
                                 val_split=plan.train_cfg.val_split, progress=False)
    if corpus.content_sha256 != plan.corpus.content_sha256:
        raise MyPTError(f"process {info.rank}: the training data on this machine "
                        f"({data.describe_sources([p.source for p in corpus.parts])}) differ from the data rank 0 "
                        "trains on; copy rank 0's files here (or put them on a shared filesystem)")
    train, val, _ = data.open_splits(corpus, plan.tokenizer, plan.train_cfg.val_split, plan.model_cfg.block_size)
    return train, val


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


def fit_world_size(plan: RunPlan, world_size: int, accum_given: bool) -> None:
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
        **(data.sources_state(plan.corpus) if plan.data_state is None else plan.data_state),
        "tokenizer": plan.tokenizer.kind,
        "versions": versions(),
        "saved_at": now(),
    }

