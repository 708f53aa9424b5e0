"""mypt.data: every input kind, document boundaries, the one pass, validation by documents and
a single file's cut, mixtures and the batch sampler, changed sources, damaged caches, bad input.
In-process, on small real text."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_text, require

from mypt import data
from mypt.data import Source, batch_at, open_splits, prepare_corpus, sources_from_flags
from mypt.data import dataset as ds
from mypt.data import prepare as prep
from mypt.data import sources as src
from mypt.data import split as splits
from mypt.data.prepare import doc_keys
from mypt.errors import MyPTError
from mypt.tokenizers import GPT2_EOT, GPT2_EOT_ID, CharTokenizer, build_tokenizer, train_bpe
from mypt.tokenizers.base import NEWLINE_CUT

pa = require("pyarrow", "data")
pq = require("pyarrow.parquet", "data")
zstd = require("compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd", "data")

TEXT = corpus_text(40_000)


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([corpus_text(200_000) + "!!\n\n?\r\n'll 123456 \u00a0\u2028"], 1024, "test text")


def docs_of(text: str, n: int) -> list[str]:
    """n real documents: consecutive paragraphs of the corpus."""
    paras = [p for p in text.split("\n\n") if p.strip()]
    return ["\n\n".join(paras[i::n]) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text", opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


def stream_ids(corpus: data.Corpus, k: int = 0) -> list[int]:
    """Every stored token of source k, in order."""
    m, folder = corpus.parts[k].manifest, corpus.parts[k].folder
    return np.concatenate([np.fromfile(folder / s["file"], dtype=s["dtype"]) for s in m["shards"]]).tolist()


def prepare(tmp_path: Path, inputs: list, tok=None, **kw) -> data.Corpus:
    sources = [Source("input", tuple(str(p) for p in inputs), kw.pop("text_field", "text"))]
    return prepare_corpus(sources, tok, tmp_path / "cache", progress=False, **{"val_split": 0.1, **kw})


def with_eot(tok, docs: list[str]) -> list[int]:
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eot_id]
    return out


# ----------------------------------------------------------------------------- what --input_file names


def test_folder_is_searched_recursively_for_known_extensions(tmp_path):
    root = tmp_path / "books"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    for name in ("a/one.txt", "a/b/two.md", "three.jsonl", "four.txt.gz", "skip.py", ".hidden.txt", ".git/x.txt"):
        (root / name).write_bytes(b"x")
    names = [f.name for f in src.list_files([str(root)])]
    assert names == ["books/four.txt.gz", "books/three.jsonl", "books/a/one.txt", "books/a/b/two.md"]
    (root / "a" / "loop").symlink_to(root)  # a link back up the tree is followed once, not forever
    assert [f.name for f in src.list_files([str(root)])] == names
    kinds = {f.name: (f.kind, f.compression) for f in src.list_files([str(root)])}
    assert kinds["books/three.jsonl"] == ("jsonl", None) and kinds["books/four.txt.gz"] == ("text", "gzip")


def test_globs_with_double_star_and_repeated_values_each_file_once(tmp_path):
    (tmp_path / "code" / "pkg").mkdir(parents=True)
    for name in ("code/a.py", "code/pkg/b.py", "code/pkg/c.txt"):
        (tmp_path / name).write_text("x = 1\n")
    files = src.list_files([str(tmp_path / "code" / "**" / "*.py"), str(tmp_path / "code" / "a.py")])
    assert [f.name for f in files] == ["a.py", "pkg/b.py"]
    assert all(f.kind == "text" for f in files)


def test_an_empty_input_file_value_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MyPTError, match=r"--input_file '': an empty path"):
        sources_from_flags(["input.txt", ""], None, None)


def test_flags_make_one_absolute_source_and_mixture_files_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [s] = sources_from_flags(["a.txt", "docs/"], "body", None)
    assert s.inputs == (str(tmp_path / "a.txt"), str(tmp_path / "docs")) and s.text_field == "body"
    (tmp_path / "sub").mkdir()
    mix = tmp_path / "sub" / "mix.json"
    mix.write_text(json.dumps({"sources": [{"name": "prose", "input_file": ["books/"], "weight": 0.7},
                                           {"name": "code", "input_file": "/abs/**/*.py", "weight": 0.3,
                                            "text_field": "content"}]}))
    prose, code = sources_from_flags(None, None, str(mix))
    with pytest.raises(MyPTError, match=r"--text_field body: name the files it applies to with --input_file"):
        sources_from_flags(None, "body", None)
    assert prose.inputs == (str(tmp_path / "sub" / "books"),) and prose.weight == 0.7  # relative to the file
    assert code.inputs == ("/abs/**/*.py",) and code.text_field == "content"


@pytest.mark.parametrize("content, message", [
    ({"sources": []}, "with at least one source"),
    ({"sources": [{"name": "a", "input_file": "x"}], "extra": 1}, "unknown key 'extra'"),
    ({"sources": [{"name": "a", "input_file": "x", "wieght": 1}]}, "source 1: unknown key 'wieght'"),
    ({"sources": [{"name": "a", "input_file": "x", "weight": 0}]}, "'weight' (0) must be a number above 0"),
    ({"sources": [{"name": "a", "input_file": []}]}, "'input_file' must be a path"),
    ({"sources": [{"name": "a", "input_file": "x"}, {"name": "a", "input_file": "y"}]}, "'a' is used twice"),
])
def test_bad_mixture_files_are_named(tmp_path, content, message):
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps(content))
    with pytest.raises(MyPTError, match=f"^{mix}: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        sources_from_flags(None, None, str(mix))


# ----------------------------------------------------------------------------- each kind, documents and EOT


def test_every_kind_of_file_is_read_as_documents_each_ending_with_eot(tmp_path, gpt2):
    docs = docs_of(TEXT, 12)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(docs[0], encoding="utf-8")
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[1:4])
    write_jsonl(tmp_path / "in" / "c.jsonl.gz", docs[4:6], opener=gzip.open)
    with zstd.open(tmp_path / "in" / "d.txt.zst", "wt", encoding="utf-8") as f:
        f.write(docs[6])
    write_parquet(tmp_path / "in" / "e.parquet", docs[7:11])
    (tmp_path / "in" / "f.json").write_text(json.dumps({"text": docs[11]}) + "\n\n")  # a blank line is skipped
    corpus = prepare(tmp_path, [tmp_path / "in"], gpt2, chunk_size=1000)
    names = [f["path"].rsplit("/", 1)[1] for f in corpus.parts[0].manifest["files"]]
    assert names == ["a.txt", "b.jsonl", "c.jsonl.gz", "d.txt.zst", "e.parquet", "f.json"]
    order = [docs[0], *docs[1:4], *docs[4:6], docs[6], *docs[7:11], docs[11]]
    assert stream_ids(corpus) == with_eot(gpt2, order)
    m = corpus.parts[0].manifest
    assert m["n_documents"] == 12 and [f["documents"] for f in m["files"]] == [1, 3, 2, 1, 4, 1]
    assert sum(f["tokens"] for f in m["files"]) == m["n_tokens"] == len(with_eot(gpt2, order))


def test_eot_only_between_documents_never_inside_one(tmp_path, gpt2):
    docs = ["literal <|endoftext|> stays text", "second", "third <|endoftext|>"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    ids = stream_ids(prepare(tmp_path, [tmp_path / "d.jsonl"], gpt2))
    eots = [i for i, t in enumerate(ids) if t == GPT2_EOT_ID]
    assert len(eots) == 3 and eots[-1] == len(ids) - 1
    pieces = np.split(np.array(ids), np.array(eots[:-1]) + 1)
    assert [gpt2.decode(p[:-1].tolist()) for p in pieces] == docs


def test_char_data_learn_the_vocabulary_in_the_same_pass(tmp_path):
    docs = ["héllo wörld", "🙂 emoji", "plain"]
    write_jsonl(tmp_path / "d.jsonl", docs)
    corpus = prepare(tmp_path, [tmp_path / "d.jsonl"], None)
    assert corpus.parts[0].manifest["tokenizer"]["chars"][:5] == ["h", "é", "l", "o", " "]  # first appearance
    tok = CharTokenizer(corpus.chars())
    assert tok.chars == sorted(set("".join(docs))) and tok.eot_id == len(tok.chars)
    train, val, _ = open_splits(corpus, tok, 0.3, 2)
    whole = np.concatenate([s.gather(np.arange(len(s))) for s in (*train.streams, *val.streams)])
    assert sorted(whole.tolist()) == sorted(with_eot(tok, docs))


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_chunked_text_tokenizes_as_the_whole_text(tmp_path, request, kind, monkeypatch):
    # Tiny chunks over text full of whitespace runs, contractions, punctuation before newlines
    # and multibyte characters: every cut must land where the split pattern splits the whole
    # text anyway (bpe's pattern keeps "!\n" together, GPT-2's does not).
    tok = request.getfixturevalue(kind)
    monkeypatch.setattr(src, "MAX_CARRY_CHUNKS", 10**9)  # never force a cut
    pieces = list("ab xy\n\t\r'sé世🙂.,!9") + ["!\n", "123456", "'ll", "  \n", " \n", "  ", "\u00a0", "\u2028",
                                              "\x0b"]
    rng = random.Random(1234)
    for trial in range(40):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 300)))
        path = tmp_path / f"t{trial}.txt"
        path.write_text(text, encoding="utf-8")
        corpus = prepare(tmp_path / str(trial), [path], tok, chunk_size=rng.randint(1, 32), val_split=0)
        assert stream_ids(corpus) == tok.encode(text) + [tok.eot_id], repr(text)


def test_text_without_whitespace_still_tokenizes(tmp_path, gpt2):
    (tmp_path / "x.txt").write_text("x" * 5000)
    ids = stream_ids(prepare(tmp_path, [tmp_path / "x.txt"], gpt2, chunk_size=64))
    assert gpt2.decode(ids[:-1]) == "x" * 5000 and ids[-1] == GPT2_EOT_ID


def test_shards_are_uint16_of_fixed_size_and_the_manifest_describes_them(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    corpus = prepare(tmp_path, [tmp_path / "a.txt"], gpt2, shard_tokens=1000)
    m = corpus.parts[0].manifest
    assert {s["dtype"] for s in m["shards"]} == {"uint16"}
    assert [s["tokens"] for s in m["shards"][:-1]] == [1000] * (len(m["shards"]) - 1)
    assert m["content_sha256"] == m["files"][0]["sha256"]  # one text file: its own sha256, as before
    assert m["tokenizer"]["id"] == "gpt2" and m["tokenizer"]["eot"] == GPT2_EOT_ID
    assert len(m["tokenizer"]["sha256"]) == 64
    assert stream_ids(corpus) == gpt2.encode(TEXT) + [GPT2_EOT_ID]
    assert sorted(p.name for p in corpus.parts[0].folder.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in m["shards"]] + [s["docs"] for s in m["shards"]])


def test_more_than_65535_characters_widen_a_shard_to_uint32(tmp_path):
    ranges = [(0x21, 0x7F), (0xA1, 0xD800), (0xE000, 0x10000), (0x10000, 0x10900)]
    text = "".join(chr(c) for lo, hi in ranges for c in range(lo, hi))
    (tmp_path / "u.txt").write_text(text, encoding="utf-8")
    corpus = prepare(tmp_path, [tmp_path / "u.txt"], None, shard_tokens=40_000)
    assert [s["dtype"] for s in corpus.parts[0].manifest["shards"]] == ["uint16", "uint32"]
    tok = CharTokenizer(corpus.chars())
    assert tok.n_vocab > 65536
    stream = data.TokenStream(ds.shards(corpus.parts[0].folder, corpus.parts[0].manifest), np.array([[0, len(text)]]),
                              data.corpus.char_table(corpus.parts[0].manifest, tok, "u"))
    assert tok.decode(stream.gather(np.arange(len(text))).tolist()) == text


# ----------------------------------------------------------------------------- validation by documents


def split_text(corpus: data.Corpus, tok, val_split: float) -> tuple[str, str, list[str]]:
    """(training text, validation text, lines) of a prepared source, decoded from its token streams."""
    train, val, lines = open_splits(corpus, tok, val_split, 1)
    return tuple(tok.decode(s.streams[0].gather(np.arange(len(s))).tolist()) for s in (train, val)) + (lines,)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_one_text_file_validates_on_its_last_bytes_from_a_line_break(tmp_path, request, kind):
    tok = CharTokenizer(sorted(set(TEXT))) if kind == "char" else request.getfixturevalue(kind)
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    for val_split in (0.1, 0.25):
        corpus = prepare(tmp_path, [tmp_path / "a.txt"], None if kind == "char" else tok, val_split=val_split)
        raw = TEXT.encode("utf-8")
        cut = corpus.parts[0].manifest["cut"]["byte"]
        point = int(len(raw) * (1 - val_split))
        assert raw[cut:cut + 1] == b"\n" and raw[cut - 1:cut].isalnum()  # a line break after a word
        assert point - 2000 < cut and not NEWLINE_CUT.search(raw[cut:point].decode())  # the last one before point
        train_text, val_text, lines = split_text(corpus, tok, val_split)
        assert train_text.encode() == raw[:cut] and val_text.encode() == raw[cut:] + tok.decode([tok.eot_id]).encode()
        if kind != "char":  # (char data store ids by first appearance)
            assert stream_ids(corpus) == tok.encode(TEXT) + [tok.eot_id]  # cut where no token crosses
        assert f"validation: its last {val_split:.0%} of the text, from byte {cut:,}" in lines[0]


def test_a_file_without_line_breaks_or_spaces_is_cut_at_a_character(tmp_path, gpt2):
    text = "a" + "\u20ac" * 2000  # 6,001 bytes; 90% of them ends inside a 3-byte character
    (tmp_path / "e.txt").write_text(text, encoding="utf-8")
    corpus = prepare(tmp_path, [tmp_path / "e.txt"], gpt2)
    assert corpus.parts[0].manifest["cut"]["byte"] == 1 + 3 * 1799
    train_text, val_text, _ = split_text(corpus, gpt2, 0.1)
    assert train_text == text[:1800] and val_text == text[1800:] + GPT2_EOT


def test_the_cut_is_found_in_compressed_text_and_is_the_plain_files(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(TEXT.encode("utf-8")))
    plain = prepare(tmp_path / "plain", [tmp_path / "a.txt"], gpt2).parts[0].manifest["cut"]
    packed = prepare(tmp_path / "gz", [tmp_path / "b.txt.gz"], gpt2).parts[0].manifest["cut"]
    assert plain == packed and plain["token"] > 0


def test_each_val_split_prepares_a_single_file_of_its_own(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "d.jsonl", docs_of(TEXT, 20))
    one = [prepare(tmp_path, [tmp_path / "a.txt"], gpt2, val_split=v).parts[0] for v in (0.1, 0.2)]
    assert one[0].folder != one[1].folder and one[0].manifest["cut"]["token"] > one[1].manifest["cut"]["token"]
    docs = [prepare(tmp_path, [tmp_path / "d"], gpt2, val_split=v).parts[0] for v in (0.1, 0.2)]
    assert docs[0].folder == docs[1].folder and docs[0].manifest["cut"] is None  # documents: one dataset


@pytest.mark.parametrize("when", ["before", "in", "after"])
def test_a_single_file_prepare_killed_around_its_cut_resumes_to_the_same_bytes(tmp_path, gpt2, monkeypatch, when):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    whole = prepare(tmp_path / "whole", [tmp_path / "a.txt"], gpt2, shard_tokens=1000)
    in_shard = whole.parts[0].manifest["cut"]["token"] // 1000  # the shard the validation starts in
    assert 2 < in_shard < len(whole.parts[0].manifest["shards"]) - 1
    at = {"before": 2, "in": in_shard, "after": in_shard + 1}[when]
    real_write = prep._write

    def killed(path: Path, parts) -> None:
        if path.name == f"{at:05d}.bin":
            raise KeyboardInterrupt
        real_write(path, parts)

    monkeypatch.setattr(prep, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "killed", [tmp_path / "a.txt"], gpt2, shard_tokens=1000)
    monkeypatch.setattr(prep, "_write", real_write)
    again = prepare(tmp_path / "killed", [tmp_path / "a.txt"], gpt2, shard_tokens=1000)
    assert again.parts[0].manifest == whole.parts[0].manifest and stream_ids(again) == stream_ids(whole)


def test_a_json_lines_source_of_one_document_is_refused(tmp_path, gpt2):
    write_jsonl(tmp_path / "one.jsonl", [TEXT])
    corpus = prepare(tmp_path, [tmp_path / "one.jsonl"], gpt2)
    message = r"one.jsonl holds one document \(one JSON line or Parquet row\).*pass its text as a plain text file"
    with pytest.raises(MyPTError, match=message):
        open_splits(corpus, gpt2, 0.1, 8)
    with pytest.raises(MyPTError, match=message):
        "".join(data.TrainingText([Source("input", (str(tmp_path / "one.jsonl"),))], tmp_path, 0.1))


def test_validation_is_whole_documents_chosen_by_their_identity(tmp_path, gpt2):
    docs = [f"document number {i}: " + d for i, d in enumerate(docs_of(TEXT, 60))]
    write_jsonl(tmp_path / "d.jsonl", docs)
    corpus = prepare(tmp_path, [tmp_path / "d.jsonl"], gpt2)
    train, val, lines = open_splits(corpus, gpt2, 0.2, 8)
    keys = doc_keys("d.jsonl", np.arange(60))
    held = [d for d, k in zip(docs, keys, strict=True) if k < 0.2 * 2**32]
    assert 0 < len(held) < 30 and f"validation: {len(held)} whole documents" in lines[0]
    val_text = gpt2.decode(val.streams[0].gather(np.arange(len(val))).tolist())
    train_text = gpt2.decode(train.streams[0].gather(np.arange(len(train))).tolist())
    assert val_text == "".join(d + GPT2_EOT for d in held)
    assert train_text == "".join(d + GPT2_EOT for d in docs if d not in held)
    again = open_splits(prepare(tmp_path, [tmp_path / "d.jsonl"], gpt2), gpt2, 0.2, 8)[1]
    assert len(again) == len(val)  # the same documents every time


def test_few_documents_still_give_each_side_one(tmp_path):
    ends = np.array([10, 20], dtype=np.uint64)
    for keys in ([5, 9], [2**32 - 1, 2**32 - 2]):  # both below val_split, then both above
        s = splits.split(ends, np.array(keys, dtype=np.uint32), 0.5 if keys[0] < 100 else 0.1, None, "d")
        assert s.tokens(s.train) == 10 and s.tokens(s.val) == 10


def test_too_short_parts_name_the_source_and_the_fix(tmp_path, gpt2):
    (tmp_path / "s.txt").write_text("hello world\n")
    corpus = prepare(tmp_path, [tmp_path / "s.txt"], gpt2)
    with pytest.raises(MyPTError, match=r"s.txt is too short: it has 4 tokens, so the training part .* block_size"
                                        r".*; use a longer input, a smaller block_size or a smaller --val_split$"):
        open_splits(corpus, gpt2, 0.1, 8)
    (tmp_path / "t.txt").write_text("hello world and a few more words here\n")
    corpus = prepare(tmp_path, [tmp_path / "t.txt"], gpt2)
    with pytest.raises(MyPTError, match=r"so the validation part \(--val_split 0.1, the end of its text\) has 3, .*; "
                                        r"use a longer input or a larger --val_split$"):
        open_splits(corpus, gpt2, 0.1, 3, None)  # None: the block size cannot change (a resumed model)


# ----------------------------------------------------------------------------- the run's text before a tokenizer


def test_training_text_of_one_text_file_is_its_text_before_the_cut(tmp_path):
    whole = "".join(f"line {i} of the text, word{i}\n" for i in range(2000))
    (tmp_path / "a.txt").write_text(whole, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(whole.encode("utf-8")))
    for name in ("a.txt", "a.txt.gz"):
        for val_split in (0.1, 0.5):
            text = data.TrainingText([Source("input", (str(tmp_path / name),))], tmp_path / "cache", val_split)
            got = "".join(text)
            point = int(len(whole.encode("utf-8")) * (1 - val_split))
            cut = splits.cut_of(src.list_files([str(tmp_path / name)]), val_split)
            assert got == whole[:cut] and text.n_bytes == cut and point - 64 < cut <= point
            assert f"the first {cut:,} bytes of " in text.describe()
    assert "".join(data.TrainingText([Source("input", (str(tmp_path / "a.txt"),))], tmp_path, 0.0)) == whole


def test_the_characters_of_the_text_are_those_the_char_data_hold(tmp_path):
    docs = ["caf\u00e9", "\u4e16\u754c", "plain"]
    whole = TEXT + "\n\u00e9\U0001f642 in the validation part only\n"
    (tmp_path / "a.txt").write_text(whole, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", docs)
    for name, content in (("a.txt", whole), ("b.jsonl", "".join(docs))):
        chars = data.TrainingText([Source("input", (str(tmp_path / name),))], tmp_path / "cache", 0.1).characters()
        assert chars == sorted(set(content)) == prepare(tmp_path / f"{name}-data", [tmp_path / name], None).chars()


def marked_docs(n: int) -> list[str]:
    return [f"<doc {i:03d}> " + d for i, d in enumerate(docs_of(TEXT, n))]


def assert_training_text_is_the_training_split(tmp_path: Path, inputs: list[Path], val_split: float, gpt2) -> None:
    """TrainingText gives the text of exactly the documents that open_splits trains on, none other."""
    corpus = prepare(tmp_path, inputs, gpt2)
    train, val, _ = open_splits(corpus, gpt2, val_split, 1)
    split = {name: gpt2.decode(s.streams[0].gather(np.arange(len(s))).tolist()) for name, s in
             (("train", train), ("val", val))}
    got = "".join(data.TrainingText([Source("input", tuple(str(p) for p in inputs))], tmp_path, val_split))
    markers = {m for m in split["train"].split() + split["val"].split() if m.startswith("<doc")}
    for m in markers:
        assert (m in got) == (m in split["train"]), (m, val_split)
    assert sorted(got) == sorted(split["train"].replace(GPT2_EOT, ""))  # the same text, only the order differs


def test_training_text_leaves_out_every_validation_document(tmp_path, gpt2):
    docs = marked_docs(40)
    (tmp_path / "in").mkdir()
    for i in range(8):  # text files: a document put aside is read again
        (tmp_path / "in" / f"t{i}.txt").write_text(docs[i], encoding="utf-8")
    write_jsonl(tmp_path / "in" / "j.jsonl.gz", docs[8:30], opener=gzip.open)
    write_parquet(tmp_path / "in" / "p.parquet", docs[30:])
    for val_split in (0.1, 0.3, 0.5):
        assert_training_text_is_the_training_split(tmp_path / str(val_split), [tmp_path / "in"], val_split, gpt2)


def test_training_text_follows_the_rules_that_give_each_side_a_document(tmp_path, gpt2):
    write_jsonl(tmp_path / "d.jsonl", marked_docs(4))
    keys = doc_keys("d.jsonl", np.arange(4)).astype(np.int64)
    below_all, above_all = keys.min() / 2**32, (keys.max() + 1) / 2**32
    # no key below the threshold: the lowest validates; every key below it: the highest trains
    for i, val_split in enumerate((below_all, above_all)):
        assert_training_text_is_the_training_split(tmp_path / str(i), [tmp_path / "d.jsonl"], val_split, gpt2)


# ----------------------------------------------------------------------------- sampler and mixtures


def test_one_stream_batches_match_the_old_sampler():
    arr = np.random.default_rng(0).integers(0, 60000, 5000).astype(np.uint16)
    x, y = batch_at(arr, 16, 4, seed=5, index=12, device="cpu")
    starts = np.random.default_rng((5, 12)).integers(0, len(arr) - 16, size=4)
    windows = arr[starts[:, None] + np.arange(17)].astype(np.int64)
    assert torch.equal(x, torch.from_numpy(windows[:, :-1])) and torch.equal(y, torch.from_numpy(windows[:, 1:]))


def test_streams_read_across_runs_and_shards():
    shards = data.sampler.Shards([np.arange(0, 10), np.arange(10, 25), np.arange(25, 40)])
    stream = data.TokenStream(shards, np.array([[3, 12], [20, 22], [30, 40]]))
    assert len(stream) == 21
    assert stream.gather(np.arange(21)).tolist() == [*range(3, 12), 20, 21, *range(30, 40)]


def test_mixture_draws_each_source_by_weight_and_is_a_pure_function():
    a = data.TokenStream.from_array(np.zeros(1000, dtype=np.uint16))
    b = data.TokenStream.from_array(np.ones(1000, dtype=np.uint16))
    mix = data.Mixture([a, b], [7, 3])
    rows = torch.cat([batch_at(mix, 8, 16, seed=1, index=i, device="cpu")[0][:, 0] for i in range(200)])
    assert abs(rows.float().mean().item() - 0.3) < 0.03
    x1, _ = batch_at(mix, 8, 16, seed=1, index=5, device="cpu")
    assert torch.equal(x1, batch_at(mix, 8, 16, seed=1, index=5, device="cpu")[0])
    assert not torch.equal(x1, batch_at(mix, 8, 16, seed=1, index=6, device="cpu")[0])


def test_mixture_corpus_opens_each_source_with_its_weight(tmp_path, gpt2):
    (tmp_path / "prose.txt").write_text(TEXT[:20000], encoding="utf-8")
    write_jsonl(tmp_path / "code.jsonl", ["def f(x):\n    return x\n" * 20] * 30, field="content")
    sources = [Source("prose", (str(tmp_path / "prose.txt"),), weight=0.7),
               Source("code", (str(tmp_path / "code.jsonl"),), "content", 0.3)]
    corpus = prepare_corpus(sources, gpt2, tmp_path / "cache", val_split=0.1, progress=False)
    train, val, lines = open_splits(corpus, gpt2, 0.1, 16)
    assert train.weights.tolist() == pytest.approx([0.7, 0.3]) and len(train.streams) == 2
    assert lines[0].startswith("source 'prose'") and lines[1].startswith("source 'code'")
    assert corpus.content_sha256 not in (corpus.parts[0].content_sha256, corpus.parts[1].content_sha256)


# ----------------------------------------------------------------------------- a prepared dataset stays current


def test_unchanged_sources_are_not_read_and_touched_ones_only_hashed(tmp_path, gpt2, monkeypatch):
    (tmp_path / "in").mkdir()
    for i, d in enumerate(docs_of(TEXT, 3)):
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    first = prepare(tmp_path, [tmp_path / "in"], gpt2)
    shard = first.parts[0].folder / first.parts[0].manifest["shards"][0]["file"]
    before = shard.stat().st_mtime_ns
    hashed: list[str] = []
    real_hash = src.hash_file
    monkeypatch.setattr(ds, "hash_file", lambda f: hashed.append(f.name) or real_hash(f))
    monkeypatch.setattr(data.corpus, "prepare", lambda *a, **k: pytest.fail("prepared again"))
    assert prepare(tmp_path, [tmp_path / "in"], gpt2).parts[0].manifest == first.parts[0].manifest
    assert hashed == []
    os.utime(tmp_path / "in" / "1.txt", ns=(1, 1))  # touched, same content
    again = prepare(tmp_path, [tmp_path / "in"], gpt2)
    assert hashed == ["in/1.txt"] and again.parts[0].manifest["files"][1]["mtime_ns"] == 1
    assert prepare(tmp_path, [tmp_path / "in"], gpt2) and hashed == ["in/1.txt"]  # the new mtime was recorded
    assert shard.stat().st_mtime_ns == before


def test_changed_content_is_prepared_again_or_refused_on_resume(tmp_path, gpt2):
    path = tmp_path / "a.txt"
    path.write_text(TEXT[:5000], encoding="utf-8")
    first = prepare(tmp_path, [path], gpt2)
    path.write_text(TEXT[5000:10000], encoding="utf-8")
    with pytest.raises(data.DataChanged):
        prepare(tmp_path, [path], gpt2, expect_sha256=first.content_sha256)
    assert first.parts[0].manifest == ds.read_manifest(first.parts[0].folder)  # nothing written
    second = prepare(tmp_path, [path], gpt2, expect_sha256=first.content_sha256, allow_change=True)
    assert second.content_sha256 != first.content_sha256
    assert stream_ids(second) == gpt2.encode(TEXT[5000:10000]) + [GPT2_EOT_ID]


@pytest.mark.parametrize("edit", [
    lambda m: {k: v for k, v in m.items() if k != "cut"} | {"format": 1},  # the earlier format: a token-tail split
    lambda m: m | {"n_tokens": str(m["n_tokens"])},
    lambda m: m | {"shards": [{**m["shards"][0], "file": "../../a.txt"}, *m["shards"][1:]]},
    lambda m: m | {"tokenizer": {**m["tokenizer"], "chars": ["ab"]}},
    lambda m: m | {"cut": {**m["cut"], "token": -1}},
])
def test_a_manifest_of_another_format_or_malformed_is_prepared_again_not_read(tmp_path, gpt2, edit):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    first = prepare(tmp_path, [tmp_path / "a.txt"], gpt2).parts[0]
    (first.folder / "manifest.json").write_text(json.dumps(edit(first.manifest)))
    again = prepare(tmp_path, [tmp_path / "a.txt"], gpt2)
    assert again.parts[0].folder == first.folder and again.parts[0].manifest == first.manifest
    assert split_text(again, gpt2, 0.1)[0] == TEXT[:first.manifest["cut"]["byte"]]


def test_every_prepared_file_is_written_through_fsutil(tmp_path, gpt2, monkeypatch):
    written: list[str] = []
    real = prep.atomic_write
    monkeypatch.setattr(prep, "atomic_write", lambda path, fill, what=None: (written.append(path.name),
                                                                            real(path, fill, what))[1])
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    corpus = prepare(tmp_path, [tmp_path / "a.txt"], gpt2, shard_tokens=3000)
    on_disk = {p.name for p in corpus.parts[0].folder.iterdir() if p.name != "lock"}
    assert on_disk <= set(written) and {"00000.bin", "00003.bin", "manifest.json"} <= on_disk
    assert stream_ids(corpus) == gpt2.encode(TEXT) + [GPT2_EOT_ID]


def test_tokenizing_uses_every_core_the_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert prep.tokenize_threads() == 12


# ----------------------------------------------------------------------------- what is read back is checked


def damage_ids(folder: Path, shard: dict, value: int) -> None:
    """Overwrite every 10th id of a shard with `value`, keeping its size (so it still looks current)."""
    path = folder / shard["file"]
    ids = np.fromfile(path, dtype=shard["dtype"])
    ids[::10] = value
    ids.tofile(path)


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_a_shard_with_ids_beyond_the_vocabulary_is_one_message_naming_the_cache(tmp_path, gpt2, kind):
    write_jsonl(tmp_path / "d.jsonl", docs_of(TEXT, 20))
    corpus = prepare(tmp_path, [tmp_path / "d.jsonl"], gpt2 if kind == "gpt2" else None, shard_tokens=4000)
    tok = gpt2 if kind == "gpt2" else CharTokenizer(corpus.chars())
    part = corpus.parts[0]
    damage_ids(part.folder, part.manifest["shards"][1], 65535)
    again = prepare(tmp_path, [tmp_path / "d.jsonl"], gpt2 if kind == "gpt2" else None, shard_tokens=4000)
    assert again.parts[0].manifest == part.manifest  # sizes and mtimes of the inputs match: taken as current
    train, val, _ = open_splits(again, tok, 0.1, 16)
    with pytest.raises(MyPTError, match=rf"^the token cache {part.folder} is damaged: 00001.bin holds the id 65535 "
                                        r"at position [\d,]+, beyond the [\d,]+ ids of its tokenizer; delete that "
                                        rf"folder \(or all of {part.folder.parent}\), and the next run or mypt "
                                        "prepare prepares it again$"):
        for i in range(50):
            for stream in (train, val):
                batch_at(stream, 16, 8, seed=0, index=i, device="cpu")


def test_a_damaged_document_index_or_cut_is_one_message_naming_the_cache(tmp_path, gpt2):
    write_jsonl(tmp_path / "d.jsonl", docs_of(TEXT, 20))
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    docs, one = (prepare(tmp_path, [tmp_path / name], gpt2).parts[0] for name in ("d.jsonl", "a.txt"))
    index = docs.folder / docs.manifest["shards"][0]["docs"]
    index.write_bytes(index.read_bytes()[:-12])  # one document short
    manifest = json.loads((one.folder / "manifest.json").read_text())
    manifest["cut"]["token"] = manifest["n_tokens"] + 5
    (one.folder / "manifest.json").write_text(json.dumps(manifest))
    for folder, what in ((docs.folder, "00000.docs does not hold the 20 documents its manifest lists"),
                         (one.folder, "its manifest's cut lies outside its document")):
        corpus = prepare(tmp_path, [tmp_path / ("d.jsonl" if folder == docs.folder else "a.txt")], gpt2)
        with pytest.raises(MyPTError, match=rf"^the token cache {folder} is damaged: {what}; delete that folder"):
            open_splits(corpus, gpt2, 0.1, 8)


# ----------------------------------------------------------------------------- bad input: one message, nothing written


def _gz_truncated(p: Path) -> None:
    p.write_bytes(gzip.compress(TEXT.encode())[:-40])


def _zst_truncated(p: Path) -> None:
    p.write_bytes(zstd.compress(TEXT.encode())[:-40])


BAD = {
    "empty-folder": (lambda d: None, "has no files ending in .txt"),
    "glob-no-match": ("*.nothing", "the pattern matches no files"),
    "jsonl-not-json": (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n'),
                       r"a.jsonl line 2 is not valid JSON"),
    "jsonl-missing-field": (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n\n{"body": "x", "id": 3}\n'),
                            r"a.jsonl line 3 has no field 'text' \(its fields: 'body', 'id'\); pass --text_field"),
    "jsonl-field-not-text": (lambda d: (d / "a.jsonl").write_text('{"text": 5}\n'),
                             r"a.jsonl line 1: the field 'text' is a number, not text"),
    "jsonl-not-object": (lambda d: (d / "a.jsonl").write_text('["text"]\n'), r"a.jsonl line 1 is a list"),
    "jsonl-surrogate": (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n'),
                        r"a.jsonl line 2: the text holds '\\ud800', an unpaired surrogate"),
    "jsonl-nul": (lambda d: (d / "a.jsonl").write_text('{"text": "a\\u0000b"}\n'), r"line 1: the text contains NUL"),
    "parquet-no-column": (lambda d: write_parquet(d / "a.parquet", ["x"], column="body"),
                          r"a.parquet has no column 'text' \(its columns: 'body', 'n'\); pass --text_field"),
    "parquet-truncated": (lambda d: (d / "a.parquet").write_bytes(
        (write_parquet(d / "a.parquet", ["x"] * 20)).read_bytes()[:-30]), r"a.parquet is not a readable Parquet"),
    "gz-truncated": (lambda d: _gz_truncated(d / "a.txt.gz"), r"a.txt.gz is truncated or is not valid gzip data"),
    "zst-truncated": (lambda d: _zst_truncated(d / "a.txt.zst"), r"a.txt.zst is truncated or is not valid zstd"),
    "binary-among-text": (lambda d: ((d / "a.txt").write_text(TEXT), (d / "b.txt").write_bytes(b"\x7fELF\x00\x01"),
                                     (d / "c.txt").write_text(TEXT)),
                          r"b.txt looks binary \(it contains NUL bytes, the first at byte offset 4\)"),
    "latin1-among-text": (lambda d: ((d / "a.txt").write_text(TEXT), (d / "b.txt").write_bytes(b"ok\ncaf\xe9\n")),
                          r"b.txt is not valid UTF-8 \(first bad byte at byte offset 6, line 2\)"),
    "fifo-in-folder": (lambda d: ((d / "a.txt").write_text(TEXT), os.mkfifo(d / "b.txt")),
                       r"b.txt \(in folder .*\): is a FIFO \(named pipe\), not a regular file"),
    "broken-link-in-folder": (lambda d: ((d / "a.txt").write_text(TEXT), (d / "b.txt").symlink_to(d / "gone.txt")),
                              r"b.txt \(in folder .*\): no such file"),
    "no-documents": (lambda d: ((d / "a.jsonl").write_text('{"text": ""}\n{"text": null}\n'),
                                (d / "b.parquet").write_bytes(write_parquet(d / "b.parquet", [""]).read_bytes())),
                     r"has no documents \(every JSON line or Parquet row has an empty or null 'text'\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_message_naming_the_file_and_nothing_is_written(tmp_path, gpt2, case):
    make, message = BAD[case]
    folder = tmp_path / "in"
    folder.mkdir()
    target = folder
    if isinstance(make, str):
        target = folder / make
    else:
        make(folder)
    with pytest.raises(MyPTError, match=message):
        prepare(tmp_path, [target], gpt2, chunk_size=4)
    assert not (tmp_path / "cache").exists()


def test_bad_input_found_late_removes_the_shards_written_before_it(tmp_path, gpt2):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "fine"}\n' * 50 + "not json\n")
    (tmp_path / "cache").mkdir()
    with pytest.raises(MyPTError, match=r"b.jsonl line 51 is not valid JSON"):
        prepare(tmp_path, [tmp_path / "in"], gpt2, shard_tokens=500)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_missing_extra_is_named(tmp_path, gpt2, monkeypatch):
    write_parquet(tmp_path / "a.parquet", ["x"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: importing it fails
    with pytest.raises(MyPTError, match=r"a.parquet needs the 'pyarrow' package, an optional extra: "
                                        r'pip install "mypt\[data\]"'):
        prepare(tmp_path, [tmp_path / "a.parquet"], gpt2)


def test_a_cache_folder_that_cannot_be_made_is_one_clear_error(tmp_path, gpt2):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(MyPTError, match=r"could not write the token cache folder .*cache/gpt2-.*; fix the problem"):
        prepare(tmp_path, [tmp_path / "a.txt"], gpt2)


def test_a_prepare_stopped_before_its_manifest_finishes_without_reading_again(tmp_path, gpt2, monkeypatch):
    from mypt.data import prepare as prep

    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    real_write = prep._write_bytes

    def crash_at_manifest(path: Path, payload: bytes) -> None:
        if path.name == "manifest.json":
            raise KeyboardInterrupt  # killed just before the manifest
        real_write(path, payload)

    monkeypatch.setattr(prep, "_write_bytes", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, [tmp_path / "a.txt"], gpt2, shard_tokens=3000)
    monkeypatch.setattr(prep, "_write_bytes", real_write)
    monkeypatch.setattr(prep, "items", lambda *a, **k: pytest.fail("the input was read again"))
    corpus = prepare(tmp_path, [tmp_path / "a.txt"], gpt2, shard_tokens=3000)
    assert stream_ids(corpus) == gpt2.encode(TEXT) + [GPT2_EOT_ID]
    assert [p.name for p in corpus.parts[0].folder.glob("*.json")] == ["manifest.json"]  # records removed


def test_a_bad_second_source_removes_the_first_one_prepared_with_it(tmp_path, gpt2):
    (tmp_path / "good.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    sources = [Source("good", (str(tmp_path / "good.txt"),)), Source("bad", (str(tmp_path / "bad.jsonl"),))]
    with pytest.raises(MyPTError, match=r"bad.jsonl line 2 has no field 'text'"):
        prepare_corpus(sources, gpt2, tmp_path / "cache", val_split=0.1, progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstd.compress)])
def test_compressed_files_are_read_in_bounded_pieces_whatever_their_ratio(tmp_path, suffix, compress):
    path = tmp_path / f"zeros.txt{suffix}"
    path.write_bytes(compress(b"a" * 50_000_000))  # a ratio in the thousands
    f = src.list_files([str(path)])[0]
    sizes = [len(c) for c in src.byte_chunks(f, hashlib.sha256(), 1 << 20)]
    assert sum(sizes) == 50_000_000 and max(sizes) <= 1 << 20
