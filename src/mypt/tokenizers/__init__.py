"""Tokenizers: text <-> token ids, and their JSON form. Knows nothing of the model or the CLI.

Three kinds share one interface (`Tokenizer`): "gpt2" (GPT-2's BPE through tiktoken, from the
shipped ranks), "char" (the characters of the training text) and "bpe" (a byte-level BPE
trained on the user's text with rustbpe, encoded through tiktoken). Each reserves an
end-of-text id, `eot_id`, and the chat tokens after it (`chat_ids`). `load` saves and loads
tokenizer.json; `StreamDecoder` prints generated tokens without splitting a UTF-8 character.
"""

from mypt.tokenizers.base import (
    CHAT_TOKENS,
    END_OF_TURN,
    EOT,
    ROLE_TOKENS,
    VOCAB_MULTIPLE,
    StreamDecoder,
    Tokenizer,
)
from mypt.tokenizers.bpe import SPLIT_PATTERN, BPETokenizer, bpe_parts, train_bpe
from mypt.tokenizers.char import CharTokenizer
from mypt.tokenizers.gpt2 import GPT2_EOT, GPT2_EOT_ID, GPT2Tokenizer, gpt2_encoding
from mypt.tokenizers.load import (
    KNOWN_KINDS,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_file,
    tokenizer_for,
    tokenizer_from_json,
)

__all__ = [
    "CHAT_TOKENS", "END_OF_TURN", "EOT", "ROLE_TOKENS",
    "VOCAB_MULTIPLE", "StreamDecoder", "Tokenizer", "SPLIT_PATTERN", "BPETokenizer", "bpe_parts",
    "train_bpe", "CharTokenizer", "GPT2_EOT", "GPT2_EOT_ID", "GPT2Tokenizer", "gpt2_encoding", "KNOWN_KINDS",
    "build_tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_file", "tokenizer_for",
    "tokenizer_from_json",
]
