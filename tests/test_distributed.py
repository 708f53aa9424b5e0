"""Training with several processes (torchrun, gloo on the CPU): DDP and FSDP2 reach the weights of
one process with twice the gradient accumulation, FSDP2 never builds the whole model on a rank,
runs resume with another process count, and a killed rank stops the others with a clear error
instead of a hang.

The torchrun tests are marked slow (each launch imports torch twice on two shared cores); they
still run in CI. The tests at the bottom check mypt.dist in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, corpus_text, run_cli, tiny_arch_flags

from mypt import dist
from mypt.checkpoint import load_checkpoint
from mypt.config import TrainConfig
from mypt.errors import MyPTError
from mypt.train_run import fit_world_size

# fp32 and no dropout: the 1- and 2-process runs then differ only by float summation order.
EXACT = ["--tokenizer", "char", "--input_file", "input.txt", "--dtype", "fp32", "--eval_iters", "2",
         "--log_interval", "3", "--eval_interval", "3", "--warmup_iters", "2", "--learning_rate", "1e-2"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Waits that only guard against a hang: far above normal timing (seconds), above the collectives'
# timeout after which a rank gives up on a silent peer.
HANG_GUARD_S = 3 * dist.COLLECTIVE_TIMEOUT_S


def train1(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """One process: plain `python train.py`."""
    return run_cli(*tiny_arch_flags(), *EXACT, *args, cwd=cwd, env=ONE_THREAD)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_cmd(*args: str) -> list[str]:
    return [*TORCHRUN, str(REPO / "train.py"), *tiny_arch_flags(), *EXACT, *args]


def train2(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Two processes launched by torchrun, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    return subprocess.run(torchrun_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def weights(cwd: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(cwd / "checkpoints" / name / "model.pt", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def training_state(cwd: Path, name: str) -> dict:
    return json.loads((cwd / "checkpoints" / name / "training_state.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The reference: one process with --grad_accum_steps 2, trained to iteration 6."""
    cwd = tmp_path_factory.mktemp("dist")
    text = corpus_text(30_000)
    (cwd / "input.txt").write_text(text, encoding="utf-8")
    result = train1(cwd, "--model_name", "ref", "--grad_accum_steps", "2", "--max_iters", "6")
    assert result.returncode == 0, result.stderr
    return cwd


@pytest.fixture(scope="module")
def ddp(runs) -> subprocess.CompletedProcess:
    """Two processes (DDP) with --grad_accum_steps 1 to iteration 6: the batches of the reference."""
    return train2(runs, "--model_name", "ddp", "--grad_accum_steps", "1", "--max_iters", "6")


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_twice_the_accumulation(runs, ddp):
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("done: iteration 6") == 1  # only rank 0 prints
    assert "(4 x 32 x 1 accum x 2 processes)" in ddp.stdout
    assert_same_weights(weights(runs, "ddp"), weights(runs, "ref"))
    state = training_state(runs, "ddp")
    assert state["world_size"] == 2 and state["tokens_seen"] == training_state(runs, "ref")["tokens_seen"]
    rows = (runs / "checkpoints" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iter"] for r in rows] == [3, 6]  # written once, by rank 0


@pytest.mark.slow
def test_fsdp_two_processes_match_and_the_checkpoint_loads_in_generate(runs):
    result = train2(runs, "--model_name", "fsdp", "--fsdp", "--grad_accum_steps", "1", "--max_iters", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_weights(weights(runs, "fsdp"), weights(runs, "ref"))
    ckpt = load_checkpoint(runs / "checkpoints" / "fsdp", with_optimizer=True)  # the usual five files
    reference = load_checkpoint(runs / "checkpoints" / "ref", with_optimizer=True)
    assert ckpt.optimizer_state["optimizer"]["state"].keys() == reference.optimizer_state["optimizer"]["state"].keys()
    sample = run_cli("--model_name", "fsdp", "--prompt", "ROMEO:", "--max_new_tokens", "5", "--seed", "1",
                     "--device", "cpu", cwd=runs, script="generate.py", env=ONE_THREAD)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("ROMEO:")


def build2(*flags: str) -> list[dict]:
    """tests/fsdp_build.py under torchrun with two processes: each rank's JSON line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    cmd = [*TORCHRUN, str(REPO / "tests" / "fsdp_build.py"), *flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                  key=lambda rank: rank["rank"])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through /proc")
def test_fsdp_never_builds_the_whole_model_on_a_rank():
    """--fsdp builds the model on the meta device and shards it before any weight exists: while
    building, no rank's peak memory rises by the whole model (150 MB), each ends with half of it,
    and the weights are those of the unsharded GPT(cfg) for every architecture variant. The same
    build under DDP, whole on each rank, shows that the measure sees a whole model."""
    sharded = build2("--fsdp")
    assert [rank["rank"] for rank in sharded] == [0, 1]
    for rank in sharded:
        assert 2 * rank["local"] == rank["model"], rank
        assert rank["rose"] < 0.8 * rank["model"], f"rank {rank['rank']}: the build took {rank['rose']:,} bytes"
    assert sharded[0]["same"] == {"gpt2": True, "modern": True, "zero_init": True}
    for rank in build2():
        assert rank["rose"] > rank["model"], rank


@pytest.mark.slow
def test_resume_with_another_process_count_keeps_the_global_batch(runs, ddp):
    """Saved by 2 (DDP) resumed on 1, and saved by 1 resumed on 2 (FSDP): the same weights."""
    assert ddp.returncode == 0, ddp.stderr
    shutil.copytree(runs / "checkpoints" / "ddp", runs / "checkpoints" / "ddp_on_1")
    shutil.copytree(runs / "checkpoints" / "ref", runs / "checkpoints" / "ref_on_2")
    one = train1(runs, "--model_name", "ddp_on_1", "--max_iters", "8")
    assert one.returncode == 0, one.stderr
    assert "resuming with 1 process(es) instead of 2: --grad_accum_steps 2 keeps the global batch" in one.stdout
    two = train2(runs, "--model_name", "ref_on_2", "--max_iters", "8", "--fsdp")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "resuming with 2 process(es) instead of 1: --grad_accum_steps 1 keeps the global batch" in two.stdout
    assert_same_weights(weights(runs, "ddp_on_1"), weights(runs, "ref_on_2"))
    assert training_state(runs, "ref_on_2")["train_config"]["grad_accum_steps"] == 1


@pytest.mark.slow
def test_muon_under_ddp_matches_one_process_and_resumes(runs):
    """Muon orthogonalises the averaged gradient on every rank: the same weights as one process."""
    muon = ("--optimizer", "muon", "--muon_lr", "0.03")
    one = train1(runs, "--model_name", "muon1", "--grad_accum_steps", "2", "--max_iters", "6", *muon)
    two = train2(runs, "--model_name", "muon2", "--grad_accum_steps", "1", "--max_iters", "6", *muon)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
    assert_same_weights(weights(runs, "muon2"), weights(runs, "muon1"))
    one = train1(runs, "--model_name", "muon1", "--max_iters", "8")  # the saved flags: Muon again
    two = train2(runs, "--model_name", "muon2", "--max_iters", "8")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
    assert "resuming 'muon2' from iteration 6" in two.stdout
    assert_same_weights(weights(runs, "muon2"), weights(runs, "muon1"))
    assert training_state(runs, "muon2")["train_config"]["optimizer"] == "muon"


@pytest.mark.slow
def test_ddp_on_a_sharded_mixture_matches_one_process(runs):
    """Two ranks read their own windows of a two-source mixture prepared into many shards, and
    reach the weights of one process with twice the accumulation."""
    text = (runs / "input.txt").read_text(encoding="utf-8")
    paras = [p for p in text.split("\n\n") if p.strip()]
    (runs / "docs").mkdir()
    (runs / "docs" / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[::2]))
    (runs / "docs" / "b.txt").write_text("\n\n".join(paras[1::2]), encoding="utf-8")
    (runs / "mix.json").write_text(json.dumps({"sources": [
        {"name": "docs", "input_file": "docs/", "weight": 3}, {"name": "book", "input_file": "input.txt"}]}))
    i = EXACT.index("--input_file")
    mix = [*EXACT[:i], *EXACT[i + 2:], "--data", "mix.json"]
    prepared = subprocess.run([sys.executable, "-m", "mypt", "prepare", "--data", "mix.json", "--tokenizer", "char",
                               "--shard_tokens", "3000"], cwd=runs, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    docs_line = prepared.stdout.splitlines()[0]  # (input.txt was prepared by the reference run: reused as it is)
    assert docs_line.startswith("docs:") and int(docs_line.split(" in ")[1].split()[0]) >= 3, prepared.stdout
    one = run_cli(*tiny_arch_flags(), *mix, "--model_name", "mix1", "--grad_accum_steps", "2", "--max_iters", "6",
                  cwd=runs, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    cmd = [*TORCHRUN, str(REPO / "train.py"), *tiny_arch_flags(), *mix, "--model_name", "mix2",
           "--grad_accum_steps", "1", "--max_iters", "6"]
    two = subprocess.run(cmd, cwd=runs, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "preparing" not in two.stderr  # both ranks found the prepared shards
    assert_same_weights(weights(runs, "mix2"), weights(runs, "mix1"))


@pytest.mark.slow
@pytest.mark.parametrize("bad", [["--input_file", "missing.txt"], ["--learning_rate", "-1"],
                                 ["--optimizer", "muon", "--fsdp"]], ids=["file", "flag", "muon-fsdp"])
def test_an_error_every_rank_has_is_printed_once(runs, bad):
    result = train2(runs, "--model_name", "bad", "--max_iters", "2", *bad)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert bad[-1] in errors[0]
    assert not (runs / "checkpoints" / "bad").exists()


def _worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started."""
    pids = {}
    for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                pids[int(item[5:])] = int(pid)
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("victim", [1, 0], ids=["kill-rank1", "kill-rank0-the-writer"])
def test_killing_one_rank_stops_the_other_with_a_clear_error(runs, victim):
    """The survivor stops by itself with PeerLost's message. The waits are only hang guards, far
    above normal timing (a loaded machine is slow, not wrong): the survivor must stop within its
    collectives' timeout, which is what turns a silent peer into an error."""
    name = f"kill{victim}"
    folder = runs / "checkpoints" / name
    cmd = torchrun_cmd("--model_name", name, "--max_iters", "100000", "--eval_interval", "2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    with open(runs / f"{name}.err", "w+") as err:
        launcher = subprocess.Popen(cmd, cwd=runs, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not (folder / "training_state.json").exists():  # the first checkpoint: training runs
                assert launcher.poll() is None, (runs / f"{name}.err").read_text()
                assert time.monotonic() < deadline, f"no checkpoint after {HANG_GUARD_S} s (hung?)"
                time.sleep(0.2)
            time.sleep(0.5)  # into the next iterations, maybe into a save: any moment will do
            os.kill(_worker_pids(launcher)[victim], signal.SIGKILL)
            try:
                launcher.wait(timeout=HANG_GUARD_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the surviving rank still runs {HANG_GUARD_S} s after its peer was killed (hung)")
        finally:
            if launcher.poll() is None:
                launcher.kill()
    stderr = (runs / f"{name}.err").read_text()
    assert launcher.returncode != 0
    survivor = 1 - victim
    assert f"error: process {survivor} of 2: another process of this run stopped or stopped answering" in stderr
    assert f"[rank{survivor}]: Traceback" not in stderr  # torchrun's own report follows, not a worker's traceback
    ckpt = load_checkpoint(folder, with_optimizer=True)  # whole, with a valid manifest
    assert ckpt.training_state["iteration"] % 2 == 0 and ckpt.training_state["world_size"] == 2


# ----------------------------------------------------------------------------- in this process


def test_dist_info_reads_what_torchrun_sets(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert dist.dist_info() == dist.DistInfo() and not dist.DistInfo().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = dist.dist_info()
    assert info == dist.DistInfo(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert info.enabled and not info.is_main


def test_one_process_helpers_are_no_ops():
    value = torch.tensor(2.5)
    assert dist.all_mean(value) is value
    assert dist.any_rank(True, torch.device("cpu")) and not dist.any_rank(False, torch.device("cpu"))
    assert dist.from_main(lambda: 7, share=lambda r: -r) == 7
    dist.barrier()
    model = torch.nn.Linear(2, 2)
    assert dist.wrap_model(model, dist.DistInfo(), torch.device("cpu")) is model
    with pytest.raises(MyPTError, match="torchrun --nproc_per_node"):
        dist.sharded_model(model, dist.DistInfo(), torch.device("cpu"), weights=None)


def _plan(saved_world: int, saved_accum: int) -> SimpleNamespace:
    resume = SimpleNamespace(training_state={"world_size": saved_world})
    return SimpleNamespace(resume=resume, train_cfg=TrainConfig(grad_accum_steps=saved_accum),
                           ckpt_dir=Path("checkpoints/m"))


def testfit_world_size_keeps_the_global_batch_or_says_why_not():
    plan = _plan(saved_world=2, saved_accum=3)
    fit_world_size(plan, world_size=6, accum_given=False)
    assert plan.train_cfg.grad_accum_steps == 1
    with pytest.raises(MyPTError, match="divides 6"):
        fit_world_size(_plan(saved_world=2, saved_accum=3), world_size=4, accum_given=False)
    given = _plan(saved_world=2, saved_accum=3)  # an explicit --grad_accum_steps wins
    fit_world_size(given, world_size=4, accum_given=True)
    assert given.train_cfg.grad_accum_steps == 3
