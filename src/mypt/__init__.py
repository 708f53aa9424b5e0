"""MyPT: train and sample GPT language models from your own text."""

__version__ = "0.1.0"
