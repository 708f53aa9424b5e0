"""Conversions between MyPT checkpoints and other formats, side by side.

- `hf_tokenizer`: the tokenizer files of a transformers folder.
"""
