"""Helpers for the server tests: tiny models trained by train.py, and a real server on 127.0.0.1.

The server is the real thing (mypt.serve's Starlette app under uvicorn) on a free port; it runs
in a thread of the test process so the loaded models are shared, or as `mypt serve` in a child
process where the command line itself is under test.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import corpus_text, require, run_cli

ARCH = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
        "--dropout", "0"]
TRAIN = ["--max_iters", "150", "--eval_interval", "150", "--eval_iters", "2", "--dtype", "fp32",
         "--learning_rate", "3e-3"]
ROTARY = {"name": "GPT-Test-Rope", "vocab_size": 50304, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
          "batch_size": 8, "dropout": 0.0, "bias": False, "position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def train_models(root: Path) -> Path:
    """checkpoints/ with 'chars' (learned positions) and 'rope' (rotary), both char-level, block 32."""
    (root / "input.txt").write_text(corpus_text(60_000), encoding="utf-8")
    (root / "rope.json").write_text(json.dumps(ROTARY), encoding="utf-8")
    for name, arch in (("chars", ARCH), ("rope", ["--config_file", "rope.json"])):
        r = run_cli("--model_name", name, "--tokenizer", "char", "--input_file", "input.txt", *arch, *TRAIN,
                    cwd=root, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
    return root / "checkpoints"


@contextlib.contextmanager
def running_server(ckpts: Path, names: list[str], *, api_key: str | None = None, loaded: list | None = None,
                   max_connections: int = 64, request_timeout: float = 30.0, **limits: int) -> Iterator[str]:
    """Serve `names` from ckpts (or the LoadedModels `loaded`) on a free 127.0.0.1 port in a
    thread, with the settings `mypt serve` runs uvicorn with; yields the base URL."""
    uvicorn = require("uvicorn")
    from mypt.api import load_model
    from mypt.cli.serve import bind
    from mypt.serve.app import Server, create_app
    from mypt.serve.connections import uvicorn_config
    from mypt.serve.protocol import Limits

    max_batch, max_queue = limits.pop("max_batch", 4), limits.pop("max_queue", 8)
    engine = {k: limits.pop(k) for k in ("prefill_tokens", "prefix_cache_tokens") if k in limits}
    models = loaded or [load_model(name, ckpts, device="cpu", dtype="fp32") for name in names]
    server = Server(models, limits=Limits(max_n=max_batch, **limits), max_batch=max_batch, max_queue=max_queue,
                    api_key=api_key, **engine)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn_config(create_app(server), max_connections=max_connections,
                                       request_timeout=request_timeout, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
