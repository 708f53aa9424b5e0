"""Serve trained models over an OpenAI-compatible HTTP API, with a page to try them in a browser.

examples:
  mypt serve --model_name dante
  mypt serve --model_name dante_tiny dante_small --port 8080 --max_batch 64
  MYPT_API_KEY=secret mypt serve --model_name dante --host 0.0.0.0

Open http://127.0.0.1:8000/ for the page. The API (the model id is the model name):
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "dante", "prompt": "Nel mezzo", "max_tokens": 50}'
Also /v1/chat/completions, /v1/models, /health and /metrics (Prometheus). Concurrent requests
are decoded together (continuous batching over --max_batch rows); more wait in a queue of --max_queue requests, and
beyond it a request gets 503 with Retry-After. A request must arrive whole within
--request_timeout seconds (else 408), and at most --max_connections connections are open at once
(a new one beyond them gets 503). Needs the serve extra: pip install -e ".[serve]".
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mypt.cli.options import add_runtime_arguments
from mypt.cli.output import INTERRUPTED
from mypt.errors import MyPTError
from mypt.sampling import MAX_COUNT

API_KEY_ENV = "MYPT_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", nargs="+", required=True, metavar="NAME",
                   help="models to serve (folders under --checkpoints_dir); each is the model id in the API")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; give another (e.g. 0.0.0.0) "
                   "explicitly to be reachable from other machines (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--best", action="store_true", help="serve each model's best-validation weights (its best/)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max_batch", type=int, default=32,
                        help="sequences decoded together per model (KV cache rows) (default: %(default)s)")
    limits.add_argument("--max_queue", type=int, default=64,
                        help="requests waiting per model; beyond it: 503 with Retry-After (default: %(default)s)")
    limits.add_argument("--max_tokens", type=int, default=1024,
                        help="most new tokens one choice may ask for (default: %(default)s)")
    limits.add_argument("--max_prompt_tokens", type=int,
                        help="longest prompt in tokens (default: each model's block_size)")
    limits.add_argument("--max_body_bytes", type=int, default=1 << 20,
                        help="largest request body; beyond it: 413 (default: %(default)s)")
    limits.add_argument("--max_connections", type=int, default=512,
                        help="connections open at once; beyond them a new one gets 503 (default: %(default)s)")
    limits.add_argument("--prefill_tokens", type=int, default=512,
                        help="prompt tokens prefilled per decoding step: a long prompt enters over several steps, "
                        "delaying the other streams by one such chunk at most (default: %(default)s)")
    limits.add_argument("--prefix_cache_tokens", type=int,
                        help="tokens of repeated prompt starts whose keys and values are kept for reuse, per "
                        "model; 0: off (default: 8 x each model's block_size)")
    limits.add_argument("--request_timeout", type=float, default=30.0,
                        help="seconds a request (headers and body) may take to arrive; beyond them: 408 and the "
                        "connection is closed (default: %(default)s)")
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log detail; info includes a line per request (default: %(default)s)")
    add_runtime_arguments(p)


# every number the server sizes something by, checked before anything is allocated
FLAG_RANGES = {"max_batch": (1, 65536), "max_queue": (1, 1_000_000), "max_tokens": (1, MAX_COUNT),
               "max_prompt_tokens": (1, MAX_COUNT), "max_body_bytes": (1, 1 << 30),
               "max_connections": (1, 1_000_000), "port": (0, 65535), "prefill_tokens": (1, MAX_COUNT),
               "prefix_cache_tokens": (0, MAX_COUNT)}
MAX_REQUEST_TIMEOUT = 3600.0


def check_args(args: argparse.Namespace) -> None:
    problems = [f"--{flag} ({getattr(args, flag)}) must be from {low:,} to {high:,}"
                for flag, (low, high) in FLAG_RANGES.items()
                if getattr(args, flag) is not None and not low <= getattr(args, flag) <= high]
    if not 0 < args.request_timeout <= MAX_REQUEST_TIMEOUT:  # also refuses nan
        problems.append(f"--request_timeout ({args.request_timeout}) must be above 0 and at most "
                        f"{MAX_REQUEST_TIMEOUT:g} seconds")
    duplicates = sorted({n for n in args.model_name if args.model_name.count(n) > 1})
    if duplicates:
        problems.append(f"--model_name lists {', '.join(duplicates)} more than once")
    if args.api_key is not None and not args.api_key.strip():
        problems.append(f"--api_key (or ${API_KEY_ENV}) is empty; give a key or leave it out")
    if problems:
        raise MyPTError("; ".join(problems))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error (port in use, unknown address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise MyPTError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        import uvicorn

        from mypt.serve.app import Server, create_app
    except ImportError as e:
        raise MyPTError(f"mypt serve needs the serve extra ({e.name} is missing): "
                        'pip install -e ".[serve]"') from None
    from mypt import dist
    from mypt.api import load_model
    from mypt.checkpoint import require_models
    from mypt.serve.connections import reserve_descriptors, uvicorn_config
    from mypt.serve.protocol import Limits

    reserve_descriptors(args.max_connections)
    require_models(args.model_name, args.checkpoints_dir)
    dist.pick_device(args.device, dist.DistInfo())  # a device MyPT cannot use is refused by name before listening
    sock = bind(args.host, args.port)
    models = [load_model(name, args.checkpoints_dir, best=args.best, device=args.device, dtype=args.dtype,
                         quantize=args.quantize)
              for name in args.model_name]
    limits = Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    max_n=args.max_batch, max_body_bytes=args.max_body_bytes)
    server = Server(models, limits=limits, max_batch=args.max_batch, max_queue=args.max_queue,
                    api_key=args.api_key, prefill_tokens=args.prefill_tokens,
                    prefix_cache_tokens=args.prefix_cache_tokens)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"serving {', '.join(server.models)} at {url}/ (API: {url}/v1; "
          f"{'API key required' if args.api_key else 'no API key'})", flush=True)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    config = uvicorn_config(create_app(server), max_connections=args.max_connections,
                            request_timeout=args.request_timeout, log_level=args.log_level)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passed Ctrl-C on
        print("stopped", file=sys.stderr, flush=True)
        return INTERRUPTED
    return 0
