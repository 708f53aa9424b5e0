"""Nothing lost over a long run: the best weights kept beside the latest, kept iterations, the
learning-rate schedule on resume, a diverging run, a linked model folder, the memory check.

The best-model tests train on a text whose training part is one sentence repeated and whose
validation part is Shakespeare: the model learns the sentence by heart, so its validation loss
falls at first and then climbs, and the best evaluation is the first (iteration 10).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, corpus_text, tiny_arch_flags
from forked_cli import run

from mypt import train_run
from mypt.api import load_model
from mypt.cli import run_command
from mypt.config import ModelConfig, TrainConfig
from mypt.dist import DistInfo
from mypt.errors import MyPTError
from mypt.trainer import get_lr

FLAGS = [*tiny_arch_flags(), "--tokenizer", "char", "--eval_interval", "10", "--eval_iters", "2",
         "--learning_rate", "1e-2", "--warmup_iters", "5", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model m trained 40 iterations with --keep_every 20 on a text it overfits."""
    work = tmp_path_factory.mktemp("keep")
    text = ("the cat sat on the mat. " * 400)[:8998] + "s\n" + corpus_text(1000)  # validation: "\n" and the last 10%
    (work / "input.txt").write_text(text, encoding="utf-8")
    (work / "held_out.txt").write_text(corpus_text(1000), encoding="utf-8")  # the validation text
    r = run("--model_name", "m", "--input_file", "input.txt", "--max_iters", "40", "--keep_every", "20", *FLAGS,
            cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    return work


def val_losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all("iter" in r and "lr" in r for r in rows)  # evaluation rows keep both fields
    return {r["iter"]: r["val_loss"] for r in rows}


def test_best_weights_are_kept_beside_the_latest(overfit: Path) -> None:
    folder = overfit / "checkpoints" / "m"
    losses = val_losses(folder)
    best_iter = min(losses, key=losses.__getitem__)
    assert best_iter == 10 and losses[40] > losses[10]  # the scenario: validation loss turned up
    best_state = json.loads((folder / "best" / "training_state.json").read_text())
    assert best_state["iteration"] == 10 and best_state["best_val_loss"] == pytest.approx(losses[10])
    latest, best = (torch.load(p / "model.pt", weights_only=True) for p in (folder, folder / "best"))
    assert not torch.equal(latest["transformer.wte.weight"], best["transformer.wte.weight"])
    assert sorted(p.name for p in (folder / "best").iterdir()) == [
        "config.json", "model.pt", "tokenizer.json", "training_state.json"]


def test_keep_every_keeps_resumable_checkpoints(overfit: Path) -> None:
    folder = overfit / "checkpoints" / "m"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("iter_")) == ["iter_20", "iter_40"]
    kept = json.loads((folder / "iter_20" / "training_state.json").read_text())
    assert kept["iteration"] == 20
    assert (folder / "iter_20" / "optimizer.pt").is_file()
    latest = torch.load(folder / "model.pt", weights_only=True)
    at_40 = torch.load(folder / "iter_40" / "model.pt", weights_only=True)
    assert all(torch.equal(latest[k], at_40[k]) for k in latest)
    for name in ("model.pt", "optimizer.pt"):  # a kept copy of the latest save costs no disk: hard links
        assert (folder / "iter_40" / name).stat().st_ino == (folder / name).stat().st_ino


def test_keep_every_keeps_exactly_its_multiples_between_evaluations(tmp_path: Path) -> None:
    """--keep_every 15 with evaluations every 10: iterations 15 and 30 are kept, as saved then
    (not the first evaluation after each multiple), and evaluations stay every 10."""
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    r = run("--model_name", "k", "--input_file", "input.txt", "--max_iters", "40", "--keep_every", "15", *FLAGS,
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    folder = tmp_path / "checkpoints" / "k"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("iter_")) == ["iter_15", "iter_30"]
    for n in (15, 30):
        kept = load_model(path=folder / f"iter_{n}", device="cpu")
        assert kept.iterations == n
    assert list(val_losses(folder)) == [10, 20, 30, 40]


def test_best_flag_of_the_api_generate_eval_and_export(overfit: Path, capsys: pytest.CaptureFixture) -> None:
    ckpts = overfit / "checkpoints"
    best = load_model("m", ckpts, best=True, device="cpu")
    saved = torch.load(ckpts / "m" / "best" / "model.pt", weights_only=True)
    assert all(torch.equal(best.model.state_dict()[k], saved[k]) for k in saved)
    assert best.name == "m" and best.iterations == 10

    def cli(*args: str) -> tuple[int, str]:
        code = run_command(args[0], [*args[1:], "--checkpoints_dir", str(ckpts)])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    held_out = str(overfit / "held_out.txt")
    code, out = cli("eval", "--model_name", "m", "--input_file", held_out, "--best", "--device", "cpu")
    assert code == 0, out
    best_loss = float(out.splitlines()[-1].split()[5])
    code, out = cli("eval", "--model_name", "m", "--input_file", held_out, "--device", "cpu")
    assert code == 0 and float(out.splitlines()[-1].split()[5]) > best_loss + 0.5  # the latest overfit

    code, out = cli("generate", "--model_name", "m", "--best", "--prompt", "the", "--temperature", "0",
                    "--max_new_tokens", "12", "--device", "cpu")
    assert code == 0 and out.startswith("the" + best.generate("the", temperature=0, max_new_tokens=12))

    out_dir = overfit / "exported_best"
    code, out = cli("export", "--model_name", "m", "--best", "--format", "safetensors", "--out", str(out_dir))
    assert code == 0 and "(best-validation weights)" in out
    exported = load_model(path=out_dir, device="cpu")
    assert exported.iterations == 10
    assert all(torch.equal(exported.model.state_dict()[k], saved[k]) for k in saved)


def test_no_keep_best_writes_no_best(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    r = run("--model_name", "n", "--input_file", "input.txt", "--max_iters", "10", "--no-keep_best", *FLAGS,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "checkpoints" / "n" / "best").exists()


# ----------------------------------------------------------------------------- the schedule on resume


def lr_at(folder: Path, iteration: int) -> float:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return next(r["lr"] for r in rows if r["iter"] == iteration)


@pytest.mark.parametrize("replan", [False, True], ids=["kept", "re-planned"])
def test_resume_keeps_the_saved_schedule_end_unless_asked(tmp_path: Path, replan: bool) -> None:
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    first = run("--model_name", "s", "--input_file", "input.txt", "--max_iters", "20", *FLAGS, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    more = ["--lr_decay_iters", "40"] if replan else []
    r = run("--model_name", "s", "--max_iters", "40", *more, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tc = TrainConfig(learning_rate=1e-2, warmup_iters=5, max_iters=40, lr_decay_iters=40 if replan else 20)
    line = next(x for x in r.stdout.splitlines() if x.startswith("learning-rate schedule:"))
    how = "re-planned by --lr_decay_iters" if replan else "as saved; pass --lr_decay_iters N to re-plan it"
    assert line == (f"learning-rate schedule: cosine decay to {tc.final_lr:.2e} ends at iteration "
                    f"{tc.lr_decay_iters} ({how}); learning rate at iteration 20: {get_lr(20, tc):.2e}")
    folder = tmp_path / "checkpoints" / "s"
    if replan:
        assert lr_at(folder, 30) == pytest.approx(get_lr(29, tc)) and lr_at(folder, 30) > tc.final_lr * 2
    else:  # no jump back up: the rate stays at its end value
        assert lr_at(folder, 30) == pytest.approx(tc.final_lr) and lr_at(folder, 40) == pytest.approx(tc.final_lr)


# ----------------------------------------------------------------------------- divergence, linked folders


def test_a_diverging_run_stops_with_status_1_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    good = run("--model_name", "d", "--input_file", "input.txt", "--max_iters", "10", *FLAGS, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    before = (tmp_path / "checkpoints" / "d" / "model.pt").read_bytes()
    r = run("--model_name", "d", "--max_iters", "30", "--learning_rate", "1000", "--grad_clip", "0",
            "--log_interval", "1", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"error: loss became (nan|inf) at iteration 1\d: training stopped and the last good checkpoint "
                     "was left as it was", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "checkpoints" / "d" / "model.pt").read_bytes() == before


def test_a_linked_model_folder_trains_into_its_target(tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text(corpus_text(20_000), encoding="utf-8")
    target = tmp_path / "bigdisk" / "l"
    target.mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "l").symlink_to(target)
    for iters in ("10", "20"):
        r = run("--model_name", "l", "--input_file", "input.txt", "--max_iters", iters, *FLAGS, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "checkpoints" / "l").is_symlink()
    assert json.loads((target / "training_state.json").read_text())["iteration"] == 20
    assert [json.loads(x)["iter"] for x in (target / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".cache", "l"]
    assert sorted(p.name for p in (tmp_path / "bigdisk").iterdir()) == ["l"]


# ----------------------------------------------------------------------------- the memory check


def test_memory_check_names_the_largest_batch_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 1 << 30
    monkeypatch.setattr(train_run, "detect_memory", lambda device: (gib, "a 1 GiB machine"))
    cfg = ModelConfig(**{**TINY_ARCH, "batch_size": 4}, vocab_size=65)
    cpu = torch.device("cpu")
    train_run.check_memory(cfg, TrainConfig(), "fp32", cpu, DistInfo(), fsdp=False)  # fits: no error
    big = ModelConfig(**{**TINY_ARCH, "batch_size": 1_000_000}, vocab_size=65)
    with pytest.raises(MyPTError) as info:
        train_run.check_memory(big, TrainConfig(), "fp32", cpu, DistInfo(), fsdp=False)
    fits = int(re.search(r"the largest batch_size that fits is (\d+)", str(info.value)).group(1))
    assert "but a 1 GiB machine has 1.00 GiB" in str(info.value) and "--skip_memory_check" in str(info.value)
    from mypt.estimate import estimate_memory

    assert estimate_memory(cfg, fits, "fp32").total <= gib < estimate_memory(cfg, fits + 1, "fp32").total
    with pytest.raises(MyPTError, match=r"x 2 processes"):  # two processes on one machine share its RAM
        train_run.check_memory(ModelConfig(**{**TINY_ARCH, "batch_size": fits}, vocab_size=65), TrainConfig(),
                               "fp32", cpu, DistInfo(world_size=2, local_world_size=2), fsdp=False)
