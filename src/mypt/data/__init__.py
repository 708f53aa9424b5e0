"""Training data: sources -> one pass -> shards + manifest -> memory-mapped batches.

- `builtin`: the built-in corpora (`builtin:python-docs`, `builtin:tinyshakespeare`).
- `sources`: what --input_file names (files, folders, globs; text, JSON lines, Parquet, .gz,
  .zst) and reading it as documents, with every check of the input.
- `prepare`: the one streaming pass per source (check, hash, tokenize, char vocabulary) into
  shards, resumable after a kill.
- `split`: the train/validation rule, decided on the text before any tokenizer exists.
- `dataset`: a prepared dataset on disk: still current?, its train/validation streams.
- `corpus`: a run's named sources and weights (mixtures), preparing and opening them, and what
  training_state.json records about them.
- `sampler`: token streams over the shards, mixtures and `batch_at`.
- `training_text`: a run's text before any tokenizer exists: the training split's (to train a
  bpe tokenizer on) and the characters of the whole (a char tokenizer's vocabulary).

It knows nothing about the model or the CLI. The token cache is CHECKPOINTS_DIR/.cache.
"""

from mypt.data.corpus import (
    CACHE_DIR,
    Corpus,
    DataChanged,
    Source,
    describe_sources,
    input_status,
    missing_inputs,
    open_splits,
    prepare_corpus,
    read_mixture,
    saved_sources,
    sources_from_flags,
    sources_state,
    training_data,
)
from mypt.data.prepare import SHARD_TOKENS
from mypt.data.sampler import Batches, Mixture, TokenStream, batch_at
from mypt.data.training_text import TrainingText

__all__ = ["CACHE_DIR", "SHARD_TOKENS", "Batches", "Corpus", "DataChanged", "Mixture", "Source", "TokenStream",
           "TrainingText", "batch_at", "describe_sources", "input_status", "missing_inputs", "open_splits",
           "prepare_corpus", "read_mixture", "saved_sources", "sources_from_flags", "sources_state", "training_data"]
