"""Tests for mypt.tokenizers: GPT-2, char and bpe tokenizers, JSON form, streaming decode."""

import hashlib
import json
import pickle
import socket

import pytest
import regex
from conftest import corpus_text

from mypt.errors import MyPTError
from mypt.tokenizers import (
    SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    StreamDecoder,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
    train_bpe,
)
from mypt.tokenizers import bpe as bpe_module
from mypt.tokenizers import gpt2 as gpt2_module

UNICODE_TEXT = "héllo 世界 🙂\nnaïve café — ok"


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


def test_gpt2_known_ids(gpt2):
    assert gpt2.kind == "gpt2"
    assert gpt2.n_vocab == 50261  # GPT-2's 50257, then the 4 chat tokens
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
    gpt2_module.gpt2_encoding.cache_clear()
    try:
        assert build_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    finally:
        gpt2_module.gpt2_encoding.cache_clear()


def test_gpt2_ranks_checksum_mismatch_is_reported(monkeypatch):
    monkeypatch.setattr(gpt2_module, "GPT2_SHA256", "0" * 64)
    with pytest.raises(MyPTError, match="gpt2.tiktoken is damaged.*reinstall mypt"):
        gpt2_module._gpt2_ranks_bytes()


def test_char_vocab_and_round_trip_unicode():
    tok = build_tokenizer("char", UNICODE_TEXT)
    assert tok.kind == "char"
    assert tok.chars == sorted(set(UNICODE_TEXT))
    assert tok.n_vocab == len(set(UNICODE_TEXT)) + 5  # the characters, then end-of-text and the chat tokens
    assert tok.eot_id == len(set(UNICODE_TEXT)) and tok.decode([tok.eot_id]) == "<|endoftext|>"
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
    chat = {"<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6}
    assert build_tokenizer("gpt2").to_json() == {"kind": "gpt2", "special_tokens": {
        "<|endoftext|>": 50256, "<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}}
    assert build_tokenizer("char", "ba").to_json() == {"kind": "char", "chars": ["a", "b"],
                                                       "special_tokens": {"<|endoftext|>": 2, **chat}}
    legacy = tokenizer_from_json({"kind": "char", "chars": ["a", "b"]}, "old.json")  # saved before end-of-text
    assert legacy.eot_id is None and legacy.n_vocab == 2
    interim = tokenizer_from_json({"kind": "char", "chars": ["a", "b"], "eot": True}, "interim.json")
    assert interim.eot_id == 2 and interim.n_vocab == 3 and not interim.chat  # saved before the chat tokens
    assert interim.to_json() == {"kind": "char", "chars": ["a", "b"], "special_tokens": {"<|endoftext|>": 2}}


def test_unknown_kind_errors_list_known_kinds():
    with pytest.raises(MyPTError, match=r"^ckpt/tok.json: unknown tokenizer kind 'wordpiece'.*'gpt2'"):
        tokenizer_from_json({"kind": "wordpiece"}, "ckpt/tok.json")
    with pytest.raises(MyPTError, match=r"unknown tokenizer kind 'words'.*'gpt2', 'char', 'bpe'"):
        build_tokenizer("words")


@pytest.mark.parametrize("chars", [None, [], ["b", "a"], ["a", "a"], ["ab"], [1, 2], "abc"])
def test_malformed_char_list_names_source(chars):
    with pytest.raises(MyPTError, match=r"^my/tok.json: the char tokenizer's 'chars'"):
        tokenizer_from_json({"kind": "char", "chars": chars}, "my/tok.json")


def test_load_tokenizer_bad_json_names_path_and_position(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text('{"kind":\n "gpt2",,}', encoding="utf-8")
    with pytest.raises(MyPTError, match=r"tok.json: malformed JSON at line 2, column 9"):
        load_tokenizer(path)
    with pytest.raises(MyPTError, match="missing.json: no such file"):
        load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_stream_decoder_never_splits_characters(request, kind):
    tok = request.getfixturevalue(kind)
    text = "héllo 世界 🙂 naïve"
    ids = tok.encode(text)
    # The test is only meaningful if some token ends inside a multibyte character.
    assert any(_incomplete_utf8(tok.decode_bytes(ids[: i + 1])) for i in range(len(ids)))
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
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


# ---------------------------------------------------------------------------------------------
# bpe

HARD_TEXTS = [
    UNICODE_TEXT,
    "   many    spaces\t\ttabs\n\n\n\nnewlines  \n",
    "Windows\r\nline\r\n\r\nends\r\n",
    "emoji 🙂👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "mojibake Ã© Ã¼ â€™ ĠĊ ¿ \ufffd \x00\x7f \u00a0\u2028\u3000 zero\u200bwidth",
    "numbers 1234567 3.14159 -42 and can't won't y'all 'LL",
    "<|endoftext|> in the text",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([corpus_text(300_000)], 1024, "test text")


def test_bpe_vocabulary_layout(bpe):
    assert bpe.kind == "bpe" and bpe.n_vocab == 1024 and bpe.model_vocab_size() == 1024
    assert bpe.eot_id == 1019 and bpe.decode([bpe.eot_id]) == "<|endoftext|>"  # then the 4 chat tokens
    assert bpe.ranks[:256] == [bytes([b]) for b in range(256)]  # byte-level: every text encodes
    assert bpe.start_ids() == [ord("\n")]
    assert train_bpe([corpus_text(300_000)], 1000, "t").model_vocab_size() == 1024  # padded to 64


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_round_trips_and_keeps_endoftext_as_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and bpe.decode_bytes(ids) == text.encode("utf-8")
    assert bpe.encode_array(text).tolist() == ids
    assert bpe.eot_id not in ids and all(0 <= i < bpe.eot_id for i in ids)


def test_bpe_tokens_never_cross_split_pattern_pieces(bpe):
    text = corpus_text(20_000) + "".join(HARD_TEXTS)
    pieces = regex.findall(SPLIT_PATTERN, text)
    assert "".join(pieces) == text and len(pieces) > 1000
    assert bpe.encode(text) == [i for piece in pieces for i in bpe.encode(piece)]
    assert len(bpe.encode(text)) < 0.5 * len(text.encode("utf-8"))  # and it does compress


def test_bpe_training_is_deterministic_and_hash_keyed(bpe):
    again = train_bpe([corpus_text(300_000)], 1024, "test text")
    assert again.ranks == bpe.ranks and again.id_string() == bpe.id_string()
    assert bpe.id_string() == "bpe-" + bpe.sha256[:12]
    other = train_bpe([corpus_text(300_000)], 1088, "test text")
    assert other.ranks[:1019] == bpe.ranks and other.id_string() != bpe.id_string()


def test_bpe_training_pieces_do_not_change_the_result(monkeypatch):
    text = corpus_text(100_000)
    whole = train_bpe([text], 600, "t")
    monkeypatch.setattr(bpe_module, "TRAIN_PIECE_CHARS", 100)
    assert len(list(bpe_module._small_pieces([text]))) > 300
    assert train_bpe([text[:5000], text[5000:]], 600, "t").ranks == whole.ranks


def test_bpe_json_round_trip_and_pickle(tmp_path, bpe):
    path = tmp_path / "tok.json"
    save_tokenizer(bpe, path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer) and loaded.ranks == bpe.ranks and loaded.pattern == SPLIT_PATTERN
    assert loaded.id_string() == bpe.id_string()
    assert json.loads(path.read_text())["kind"] == "bpe"
    unpickled = pickle.loads(pickle.dumps(bpe))  # torchrun ships the plan to the other ranks
    assert unpickled.encode(UNICODE_TEXT) == bpe.encode(UNICODE_TEXT)


def _edited(d: dict, change) -> dict:
    d = json.loads(json.dumps(d))
    change(d)
    return d


def _rehash(d: dict) -> dict:
    d["sha256"] = bpe_module._content_sha256({k: v for k, v in d.items() if k != "sha256"})
    return d


@pytest.mark.parametrize("change, message", [
    (lambda d: d["ranks"].__setitem__(300, d["ranks"][301]), "does not match its sha256"),
    (lambda d: d.__setitem__("pattern", r"\s+"), "does not match its sha256"),
    (lambda d: d["special_tokens"].__setitem__("<|endoftext|>", 5), "does not match its sha256"),
    (lambda d: d.pop("sha256"), "does not match its sha256"),
    (lambda d: _rehash(d) and d["ranks"].__setitem__(300, d["ranks"][301]) or _rehash(d), "repeated token"),
    (lambda d: d["ranks"].__setitem__(65, "QUJD") or _rehash(d), "lacks 1 of the 256 single bytes"),
    (lambda d: d["ranks"].__setitem__(700, "enp6eno=") or _rehash(d), "token 700 .* is not a merge"),
    (lambda d: d["ranks"].__setitem__(700, "%%%") or _rehash(d), "not base64"),
    (lambda d: d.__setitem__("version", 9) or _rehash(d), "format version 9"),
    (lambda d: d.__setitem__("pattern", "(") or _rehash(d), "split pattern is not a regular expression"),
    # hashes recomputed: what is read back is checked, not only the hash
    (lambda d: d.__setitem__("pattern", "a*") or _rehash(d), "split pattern matches the empty string"),
    (lambda d: d.__setitem__("pattern", r"\s+|(?<=a)") or _rehash(d), "split pattern matches the empty string"),
    (lambda d: d.__setitem__("pattern", r"\p{L}+|\s+") or _rehash(d), r"leaves characters of '1' out"),
    (lambda d: d.__setitem__("extra", [[[]]]) or _rehash(d), "unknown key 'extra'"),
    (lambda d: d.__setitem__("ranks", d["ranks"][:200]) or _rehash(d), "'ranks' holds 200 tokens"),
    (lambda d: d.__setitem__("special_tokens", {"<|endoftext|>": 10**6}) or _rehash(d), "'special_tokens' must be"),
])
def test_bpe_edited_or_corrupted_file_is_refused_by_name(bpe, change, message):
    with pytest.raises(MyPTError, match=f"^ckpt/tokenizer.json: .*{message}"):
        tokenizer_from_json(_edited(bpe.to_json(), change), "ckpt/tokenizer.json")


@pytest.mark.parametrize("vocab_size", [0, 256, 10**9])
def test_bpe_vocab_size_out_of_range(vocab_size):
    with pytest.raises(MyPTError, match=f"--vocab_size {vocab_size} is out of range.*at least 261"):
        train_bpe(["some text"], vocab_size, "t")


def test_bpe_text_too_short_or_empty():
    with pytest.raises(MyPTError, match=r"^tiny\.txt is too short for a bpe tokenizer of 4096 tokens: its 17 "
                                        r"characters support only \d+ .*use --vocab_size \d+ or less"):
        train_bpe(["hello world hello"], 4096, "tiny.txt")
    with pytest.raises(MyPTError, match="^empty.txt is empty"):
        train_bpe(["", ""], 300, "empty.txt")


def test_not_a_tokenizer_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(MyPTError, match="other.json: not a MyPT tokenizer file"):
        load_tokenizer(path)
    path.write_text("[1, 2]")
    with pytest.raises(MyPTError, match="other.json: tokenizer description must be a JSON object"):
        load_tokenizer(path)


def test_legacy_char_file_without_end_of_text_loads_as_before():
    legacy = tokenizer_from_json({"kind": "char", "chars": ["\n", "a", "b"]}, "old/tokenizer.json")
    assert legacy.eot_id is None and legacy.n_vocab == 3 and legacy.encode("ab\n") == [1, 2, 0]
    digest = hashlib.sha256(b"\nab").hexdigest()[:12]
    assert legacy.id_string() == "char-" + digest  # the token cache of old runs stays valid
    assert legacy.to_json() == {"kind": "char", "chars": ["\n", "a", "b"]}
    assert build_tokenizer("char", "ab\n").id_string() != legacy.id_string()
    with pytest.raises(MyPTError, match="'special_tokens' must be"):
        tokenizer_from_json({"kind": "char", "chars": ["a"], "special_tokens": {"<|endoftext|>": 0}}, "x")


def test_every_kind_has_an_end_of_text_id(gpt2, bpe):
    char = build_tokenizer("char", "abc<|endoftext|>")
    assert (gpt2.eot_id, char.eot_id, bpe.eot_id) == (50256, len(char.chars), 1019)
    for tok in (gpt2, char, bpe):
        assert tok.eot_id == tok.n_vocab - 5 and tok.decode([tok.eot_id]) == "<|endoftext|>"
        assert tok.eot_id not in tok.encode("abc<|endoftext|>cba")


def test_a_rehashed_file_whose_pattern_matches_nothing_never_reaches_tiktoken(tmp_path, bpe):
    """tiktoken panics (a Rust panic, not an exception) on a split pattern that matches the empty string."""
    d = _rehash(_edited(bpe.to_json(), lambda d: d.__setitem__("pattern", r"\s*")))
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(d))
    with pytest.raises(MyPTError, match=rf"^{path}: its split pattern matches the empty string .*restore it"):
        load_tokenizer(path)


def test_the_shipped_split_patterns_pass_the_check():
    from mypt.tokenizers.bpe import pattern_problem
    from mypt.tokenizers.gpt2 import GPT2_PAT_STR

    assert pattern_problem(SPLIT_PATTERN) is None and pattern_problem(GPT2_PAT_STR) is None


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_tokenizer_file_nested_100000_deep_is_one_message(tmp_path, kind):
    path = tmp_path / "tok.json"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(f'{{"kind": "{kind}", "chars": {deep}}}')
    with pytest.raises(MyPTError, match=rf"^{path}: lists and objects are nested more than 100 deep"):
        load_tokenizer(path)


CHAT_TEXT = "a<|system|>b<|user|>c<|assistant|>d<|end|>e<|endoftext|>"


def test_every_kind_reserves_the_chat_tokens_after_end_of_text(gpt2, bpe):
    """Four ids after end-of-text, spelled as the tokens when decoded, never made from text."""
    char = build_tokenizer("char", CHAT_TEXT)
    for tok in (gpt2, char, bpe):
        assert tok.chat and list(tok.chat_ids) == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
        assert list(tok.chat_ids.values()) == [tok.eot_id + 1, tok.eot_id + 2, tok.eot_id + 3, tok.eot_id + 4]
        assert tok.decode(list(tok.chat_ids.values())) == "<|system|><|user|><|assistant|><|end|>"
        ids = tok.encode(CHAT_TEXT)
        assert not set(ids) & {tok.eot_id, *tok.chat_ids.values()} and tok.decode(ids) == CHAT_TEXT
        assert tok.encode_array(CHAT_TEXT).tolist() == ids
        again = tokenizer_from_json(json.loads(json.dumps(tok.to_json())), "t.json")
        assert again.chat_ids == tok.chat_ids and again.id_string() == tok.id_string()


def test_tokenizers_saved_before_the_chat_tokens_load_without_them(bpe):
    """A gpt2, char or bpe tokenizer.json from before: the same ids for text, no chat ids;
    with_chat() adds them (what fine-tuning does), changing no id of any text."""
    old_bpe = dict(bpe.to_json(), special_tokens={"<|endoftext|>": bpe.eot_id})
    content = {k: v for k, v in old_bpe.items() if k != "sha256"}
    old_bpe["sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                                                  ensure_ascii=True).encode()).hexdigest()
    olds = [{"kind": "gpt2"}, {"kind": "char", "chars": sorted(set(UNICODE_TEXT)), "special_tokens": {
        "<|endoftext|>": len(set(UNICODE_TEXT))}}, old_bpe]
    for saved in olds:
        old = tokenizer_from_json(saved, "old.json")
        assert not old.chat and old.chat_ids == {} and old.n_vocab == old.eot_id + 1
        assert old.to_json() == saved
        new = old.with_chat()
        assert new.chat and new.n_vocab == old.n_vocab + 4 and new.eot_id == old.eot_id
        assert new.encode(UNICODE_TEXT) == old.encode(UNICODE_TEXT)
        assert new.with_chat() is new
    assert tokenizer_from_json({"kind": "gpt2"}, "x").id_string() == "gpt2"  # gpt2's token cache stays valid


def test_chat_format_is_kept_and_checked():
    tok = build_tokenizer("char", "ab")
    tok.chat_format = "mypt-chat-1"
    assert tokenizer_from_json(tok.to_json(), "t.json").chat_format == "mypt-chat-1"
    assert tokenizer_from_json(build_tokenizer("char", "ab").to_json(), "t.json").chat_format is None
    with pytest.raises(MyPTError, match="^t.json: 'chat_format' must be"):
        tokenizer_from_json({"kind": "gpt2", "chat_format": "mypt-chat-1"}, "t.json")  # no chat tokens
    with pytest.raises(MyPTError, match="^t.json: 'special_tokens' must be"):
        tokenizer_from_json({"kind": "gpt2", "special_tokens": {"<|endoftext|>": 50256, "<|user|>": 50257}}, "t.json")
