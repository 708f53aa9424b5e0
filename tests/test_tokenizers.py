"""Tests for mypt.tokenizers: GPT-2 and char tokenizers, JSON form, streaming decode."""

import json
import socket

import pytest

from mypt import tokenizers
from mypt.errors import MyPTError
from mypt.tokenizers import (
    CharTokenizer,
    StreamDecoder,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
)

UNICODE_TEXT = "héllo 世界 🙂\nnaïve café — ok"


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2):
    assert gpt2.kind == "gpt2"
    assert gpt2.n_vocab == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.start_ids() == [50256]


def test_gpt2_endoftext_in_text_is_ordinary_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_round_trip_unicode(gpt2):
    ids = gpt2.encode(UNICODE_TEXT)
    assert gpt2.decode(ids) == UNICODE_TEXT
    assert gpt2.decode_bytes(ids) == UNICODE_TEXT.encode("utf-8")


def test_encode_array_matches_encode(gpt2):
    char = build_tokenizer("char", UNICODE_TEXT + "<|endoftext|> the")
    for tok in (gpt2, char):
        for text in ["Hello world", UNICODE_TEXT, "", " the end\n", "a <|endoftext|> b"]:
            if tok is char and not set(text) <= set(char.chars):
                continue
            ids = tok.encode_array(text)
            assert ids.dtype.kind in "iu" and ids.tolist() == tok.encode(text)


def test_gpt2_builds_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the gpt2 tokenizer tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokenizers.gpt2_encoding.cache_clear()
    try:
        assert build_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    finally:
        tokenizers.gpt2_encoding.cache_clear()


def test_gpt2_ranks_checksum_mismatch_is_reported(monkeypatch):
    monkeypatch.setattr(tokenizers, "GPT2_SHA256", "0" * 64)
    with pytest.raises(MyPTError, match="gpt2.tiktoken is corrupted.*reinstall mypt"):
        tokenizers._gpt2_ranks_bytes()


def test_char_vocab_and_round_trip_unicode():
    tok = build_tokenizer("char", UNICODE_TEXT)
    assert tok.kind == "char"
    assert tok.chars == sorted(set(UNICODE_TEXT))
    assert tok.n_vocab == len(set(UNICODE_TEXT)) + 1 and tok.eot_id == len(tok.chars)  # the end-of-text after them
    ids = tok.encode(UNICODE_TEXT)
    assert ids == [tok.chars.index(c) for c in UNICODE_TEXT]
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode_bytes(ids) == UNICODE_TEXT.encode("utf-8")
    assert tok.encode("") == []


def test_char_start_ids():
    assert build_tokenizer("char", "b\na").start_ids() == [0]  # "\n" sorts first
    with_newline = build_tokenizer("char", "xyz\n")
    assert with_newline.decode(with_newline.start_ids()) == "\n"
    assert build_tokenizer("char", "zyx").start_ids() == [0]


def test_char_unknown_characters_are_named():
    tok = build_tokenizer("char", "hello world")
    with pytest.raises(MyPTError) as err:
        tok.encode("héllo € world é")
    msg = str(err.value)
    assert msg.startswith("prompt contains characters not in this model's vocabulary: 'é', '€'")
    assert "only knows the characters of its training text" in msg
    with pytest.raises(MyPTError, match="^input file x.txt contains characters"):
        tok.encode_array("hello wörld", what="input file x.txt")


def test_char_id_string_is_stable_and_content_based():
    a = build_tokenizer("char", "abc")
    assert a.id_string() == build_tokenizer("char", "cba").id_string()
    assert a.id_string().startswith("char-") and len(a.id_string()) == len("char-") + 12
    assert a.id_string() != build_tokenizer("char", "abd").id_string()
    assert build_tokenizer("gpt2").id_string() == "gpt2"


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_json_round_trip(tmp_path, kind):
    tok = build_tokenizer(kind, UNICODE_TEXT)
    again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())), "test")
    assert type(again) is type(tok)
    assert again.to_json() == tok.to_json()
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)

    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    loaded = load_tokenizer(path)
    assert loaded.id_string() == tok.id_string()
    assert loaded.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)


def test_to_json_shapes():
    assert build_tokenizer("gpt2").to_json() == {"kind": "gpt2"}
    assert build_tokenizer("char", "ba").to_json() == {"kind": "char", "chars": ["a", "b"], "eot": True}
    legacy = tokenizer_from_json({"kind": "char", "chars": ["a", "b"]}, "old.json")  # saved before end-of-text
    assert legacy.eot_id is None and legacy.n_vocab == 2


def test_unknown_kind_errors_list_known_kinds():
    with pytest.raises(MyPTError, match=r"^ckpt/tok.json: unknown tokenizer kind 'bpe'.*'gpt2'"):
        tokenizer_from_json({"kind": "bpe"}, "ckpt/tok.json")
    with pytest.raises(MyPTError, match=r"unknown tokenizer kind 'words'.*'gpt2', 'char'"):
        build_tokenizer("words")


@pytest.mark.parametrize("chars", [None, [], ["b", "a"], ["a", "a"], ["ab"], [1, 2], "abc"])
def test_malformed_char_list_names_source(chars):
    with pytest.raises(MyPTError, match=r"^my/tok.json: the char tokenizer's 'chars'"):
        tokenizer_from_json({"kind": "char", "chars": chars}, "my/tok.json")


def test_load_tokenizer_bad_json_names_path_and_position(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text('{"kind":\n "gpt2",,}', encoding="utf-8")
    with pytest.raises(MyPTError, match=r"tok.json is not valid JSON \(line 2, column 9"):
        load_tokenizer(path)
    with pytest.raises(MyPTError, match="cannot read tokenizer file .*missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_stream_decoder_never_splits_characters(gpt2):
    text = "héllo 世界 🙂"
    ids = gpt2.encode(text)
    # The test is only meaningful if some token ends inside a multibyte character.
    assert any(_incomplete_utf8(gpt2.decode_bytes(ids[: i + 1])) for i in range(len(ids)))
    stream = StreamDecoder(gpt2)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == gpt2.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back


def test_stream_decoder_flush_replaces_incomplete_character(gpt2):
    emoji_ids = gpt2.encode("🙂")
    assert len(emoji_ids) > 1
    stream = StreamDecoder(gpt2)
    assert stream.feed(emoji_ids[0]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.feed(gpt2.encode("ok")[0]) == "ok"  # usable again after flush


def test_stream_decoder_char():
    tok = build_tokenizer("char", UNICODE_TEXT)
    stream = StreamDecoder(tok)
    assert "".join(stream.feed(i) for i in tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert stream.flush() == ""


def test_char_tokenizer_rejects_unsorted_chars_internally():
    with pytest.raises(AssertionError):
        CharTokenizer(["b", "a"])


def _incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
