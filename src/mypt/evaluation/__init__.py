"""Task evaluation: task files -> per-item log-likelihoods -> scores.

- `tasks`: reading task files (MyPT's JSON lines fields and the public ones of HellaSwag, ARC,
  PIQA and Winogrande, mapped in one table), few-shot prompts.
- `builtin`: the task set built from the text MyPT ships (`--task builtin`).
- `scoring`: the log-likelihood of continuations given contexts (each shared context computed
  once through the KV cache, items batched), greedy exact match, bits per byte.
- `report`: accuracy, standard error, random baseline, centered score; table, JSON lines, plot.
"""
