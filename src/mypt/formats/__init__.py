"""Conversions between MyPT checkpoints and other formats, side by side.

- `hf`: Hugging Face transformers folders, both ways (folder-level export and import).
- `hf_gpt2`: GPT-2's name map, shape rule and config.json schema.
- `hf_llama`: Llama's and Qwen3's name map, shape rule (the rotary row order) and config.json schema.
- `hf_tokenizer`: the tokenizer files of a transformers folder.
- `hf_config`: what the families share when reading a config.json.
"""
