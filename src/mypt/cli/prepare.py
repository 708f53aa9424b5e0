"""Prepare training data once: tokenize it into shards in the token cache that train.py reads.

examples:
  mypt prepare --input_file input.txt
  mypt prepare --input_file books/ --input_file 'web/**/*.jsonl.gz' --tokenizer gpt2
  mypt prepare --input_file corpus.parquet --text_field content --tokenizer char
  mypt prepare --input_file books/ --tokenizer my_tokenizer.json   # for train.py --tokenizer my_tokenizer.json
  mypt prepare --data mix.json --checkpoints_dir /big/disk/checkpoints

train.py prepares what it needs by itself; this command does that step alone (say, before
starting a job on many machines). It reads every input once, checks it (UTF-8, JSON lines,
Parquet columns, compressed files), hashes it and tokenizes it on every core it may use into
shards of --shard_tokens ids under CHECKPOINTS_DIR/.cache/, with a manifest. A source of one
text file is cut where its validation starts, so pass the --val_split train.py will use (a
source of several documents does not depend on it). Stop it at any time and run it again:
finished shards are kept and it continues. Data already prepared is not read again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mypt.cli.options import add_checkpoints_dir, check_count
from mypt.cli.output import INTERRUPTED
from mypt.config import check_train_flags
from mypt.errors import MyPTError

if TYPE_CHECKING:
    from mypt.tokenizers import Tokenizer

MAX_SHARD_TOKENS = 1 << 32  # ids per shard file: 16 GiB of uint32 ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mypt.config import TrainConfig
    from mypt.data import SHARD_TOKENS

    p.add_argument("--input_file", action="append", metavar="PATH",
                   help="a text file, a folder (recursive) or a glob; repeatable (as in train.py)")
    p.add_argument("--text_field", metavar="NAME", help="the JSON field / Parquet column holding the text "
                   "(default: text)")
    p.add_argument("--data", metavar="MIX.json", help="a mixture file of named sources (as in train.py)")
    p.add_argument("--tokenizer", default="gpt2", metavar="{gpt2,char,FILE.json}",
                   help="the tokenizer of the model that will train on it: gpt2, char, or a tokenizer file "
                   "(mypt tokenizer train writes one) (default: %(default)s)")
    add_checkpoints_dir(p, "the cache is CHECKPOINTS_DIR/.cache, as for train.py (default: %(default)s)")
    p.add_argument("--shard_tokens", type=int, default=SHARD_TOKENS,
                   help="token ids per shard file (default: %(default)s)")
    p.add_argument("--val_split", type=float, default=TrainConfig.val_split,
                   help="the --val_split train.py will use: where a single text file's validation starts (its "
                   "last fraction of text); sources of several documents do not depend on it (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from mypt import data

    check_count("--shard_tokens", args.shard_tokens, MAX_SHARD_TOKENS)
    check_train_flags({"val_split": args.val_split})
    sources = data.sources_from_flags(args.input_file, args.text_field, args.data)
    if sources is None:
        raise MyPTError("name the data to prepare with --input_file (repeatable) or --data MIX.json")
    tokenizer = _tokenizer(args.tokenizer)
    cache = Path(args.checkpoints_dir) / data.CACHE_DIR
    try:
        corpus = data.prepare_corpus(sources, tokenizer, cache, val_split=args.val_split,
                                     shard_tokens=args.shard_tokens)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished shards are kept; run the same command to continue", file=sys.stderr)
        return INTERRUPTED
    for p in corpus.parts:
        m = p.manifest
        vocab = f", {len(m['tokenizer']['chars'])} distinct characters" if "chars" in m["tokenizer"] else ""
        print(f"{p.source.name}: {len(m['files'])} file(s), {m['n_documents']:,} documents, {m['n_tokens']:,} "
              f"tokens{vocab} in {len(m['shards'])} shard(s)\n  {p.folder}  (content sha256 {p.content_sha256[:16]})")
    return 0


def _tokenizer(choice: str) -> Tokenizer | None:
    """The tokenizer to prepare with (None: char, whose vocabulary comes from the data)."""
    from mypt.tokenizers import tokenizer_for

    if choice == "char":
        return None
    if choice == "bpe":
        raise MyPTError("--tokenizer bpe: train.py trains a new bpe tokenizer on its run's training data and "
                        "prepares the data with it; to prepare ahead, train one (mypt tokenizer train) and pass "
                        "--tokenizer FILE.json here and to train.py")
    return tokenizer_for(choice)
