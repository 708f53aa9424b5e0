"""Train a bpe tokenizer on your text, or look inside a tokenizer.

examples:
  mypt tokenizer train --input_file input.txt --vocab_size 4096 --out my_tokenizer.json
  python train.py --config_file configs/tiny.json --model_name a --input_file input.txt --tokenizer my_tokenizer.json
  mypt tokenizer inspect my_tokenizer.json --input_file input.txt
  mypt tokenizer inspect --model_name dante --top 20

train: a byte-level BPE of --vocab_size tokens (end-of-text and the 4 chat tokens included) on
--input_file, written as a self-contained tokenizer.json. One tokenizer file can serve several
models (train.py --tokenizer FILE.json), so their losses compare token for token. --val_split F leaves out what
train.py --val_split F validates on: whole documents chosen by their names, or for a single
document (one text file) its text from the last line break before (1 - F) of its bytes, so
that a model trained on the same data with the same --val_split validates on text the
tokenizer never saw.

inspect: the kind, the vocabulary size, the end-of-text id and the cache key of a tokenizer
file or a model's tokenizer; bytes and characters per token on --input_file; the longest tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mypt.cli.options import add_checkpoints_dir
from mypt.cli.output import tokenizer_summary
from mypt.errors import MyPTError
from mypt.tokenizers import BPETokenizer, Tokenizer

if TYPE_CHECKING:
    from mypt.data import TrainingText


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{train,inspect}")
    t = sub.add_parser("train", help="train a bpe tokenizer on a text file",
                       description="Train a byte-level BPE tokenizer on a UTF-8 text file.")
    t.add_argument("--input_file", required=True, action="append", metavar="PATH",
                   help="what to train on, repeatable: a UTF-8 text file, a folder or a glob; .jsonl/.json "
                   "lines and .parquet rows are documents (as train.py reads --input_file)")
    t.add_argument("--text_field", metavar="NAME", help="the JSON field / Parquet column holding the text "
                   "(default: text)")
    t.add_argument("--vocab_size", type=int, required=True,
                   help="tokens, end-of-text and the 4 chat tokens included (e.g. 4096)")
    t.add_argument("--out", required=True, help="the tokenizer file to write (FILE.json; must not exist)")
    t.add_argument("--val_split", type=float, default=0.0,
                   help="leave out the validation part, as train.py's --val_split does: whole documents, or "
                   "a single document's last fraction (default: 0)")
    i = sub.add_parser("inspect", help="describe a tokenizer file or a model's tokenizer",
                       description="Describe a tokenizer: size, bytes per token on a text, longest tokens.")
    i.add_argument("file", nargs="?", help="a tokenizer .json file (or give --model_name)")
    i.add_argument("--model_name", help="inspect this model's tokenizer.json instead")
    add_checkpoints_dir(i)
    i.add_argument("--input_file", help="report bytes and characters per token on this text (a file, folder "
                   "or glob, read as train.py reads it)")
    i.add_argument("--top", type=int, default=10, help="how many of the longest tokens to list (default: 10)")


def run(args: argparse.Namespace) -> int:
    return train(args) if args.action == "train" else inspect(args)


def train(args: argparse.Namespace) -> int:
    from mypt.tokenizers import save_tokenizer, train_bpe
    from mypt.tokenizers.bpe import check_vocab_size

    out = Path(args.out)
    check_vocab_size(args.vocab_size)
    if not 0 <= args.val_split <= 0.5:
        raise MyPTError(f"--val_split must be in [0, 0.5], got {args.val_split}")
    if out.exists():
        raise MyPTError(f"--out {out} already exists; remove it or pick another --out")
    if not out.parent.is_dir():
        raise MyPTError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    text = _text(args.input_file, args.text_field, args.val_split)
    start = time.perf_counter()
    tok = train_bpe(text, args.vocab_size, f"--input_file {' '.join(args.input_file)}")
    seconds = time.perf_counter() - start
    save_tokenizer(tok, out)
    print(f"wrote {out}: bpe, {tok.n_vocab:,} tokens (end-of-text {tok.eot_id}, {tok.id_string()}), "
          f"trained on {text.n_bytes / 1e6:.1f} MB ({text.describe()}) in {seconds:.1f} s")
    return 0


def _text(input_files: list[str], text_field: str | None, val_split: float) -> TrainingText:
    """The text of the inputs (as train.py reads them) without its validation part (val_split 0: all)."""
    from mypt import data

    sources = data.sources_from_flags(input_files, text_field, None)
    assert sources is not None, "argparse requires --input_file"
    return data.TrainingText(sources, Path("checkpoints") / data.CACHE_DIR, val_split)


def inspect(args: argparse.Namespace) -> int:
    tok, source = _inspected(args)
    lines = [f"Tokenizer   : {source}", f"Kind        : {tokenizer_summary(tok)}",
             f"Model vocab : {tok.model_vocab_size():,} (the vocab_size a new model gets)"]
    if isinstance(tok, BPETokenizer):
        lines.append(f"Split       : {tok.pattern}")
    if args.input_file:
        lines += _compression(tok, args.input_file)
    lines += _longest(tok, args.top)
    print("\n".join(lines))
    return 0


def _inspected(args: argparse.Namespace) -> tuple[Tokenizer, str]:
    from mypt.checkpoint import checkpoint_dir
    from mypt.tokenizers import load_tokenizer

    if (args.file is None) == (args.model_name is None):
        raise MyPTError("give a tokenizer file or --model_name (one of the two)")
    if args.model_name is not None:
        folder = checkpoint_dir(args.checkpoints_dir, args.model_name)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MyPTError(f"no model named '{args.model_name}' with a tokenizer.json in {folder.parent}/; "
                            "check --model_name and --checkpoints_dir")
    else:
        path = Path(args.file)
    return load_tokenizer(path), str(path)


def _compression(tok: Tokenizer, input_file: str) -> list[str]:
    n_bytes = n_chars = n_tokens = 0
    for text in _text([input_file], None, 0.0):
        n_tokens += len(tok.encode_array(text, what=f"--input_file {input_file}"))
        n_chars += len(text)
        n_bytes += len(text.encode("utf-8"))
    return [f"On {input_file}: {n_tokens:,} tokens, {n_bytes / n_tokens:.2f} bytes and "
            f"{n_chars / n_tokens:.2f} characters per token"]


def _longest(tok: Tokenizer, top: int) -> list[str]:
    if top <= 0:
        return []
    special = {tok.eot_id, *tok.chat_ids.values()}
    tokens = [(len(tok.decode_bytes([i])), i) for i in range(tok.n_vocab) if i not in special]
    tokens.sort(key=lambda item: (-item[0], item[1]))
    lines = [f"Longest tokens ({min(top, len(tokens))} of {len(tokens):,}):"]
    for size, i in tokens[:top]:
        lines.append(f"  {i:>7}  {size:>3} bytes  {tok.decode([i])!r}")
    return lines
