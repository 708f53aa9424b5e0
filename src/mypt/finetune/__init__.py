"""Fine-tuning a trained model: supervised fine-tuning on conversations into a chat model, and
LoRA adapters applied from outside the model.

- `chat_data`: JSON lines / Parquet records in three shapes -> conversations, checked, split.
- `template`: MyPT's chat template: a conversation -> token ids and the targets trained on
  (the assistant's), and the same template as Jinja for transformers.
- `packing`: conversations -> rows of block_size + 1 tokens with masked targets -> batches.
- `run`: the fine-tuning run (`mypt finetune`), new or resumed, on train.py's machinery.
- `lora`: low-rank adapters on the blocks' linear layers, and merging them back.
"""

DEFAULT_EPOCHS = 2
# Fine-tuning's own defaults (the flags override them; here, without torch, for --help): a tenth
# of the base's peak learning rate (LR_FRACTION; 1e-4, a tenth of train.py's default, for a base
# that records none), three times that for LoRA (LORA_LR_FACTOR: its few parameters move
# slower; BENCHMARKS.md, Issue 21), and no weight decay; the schedule, evaluation and logging
# scale with the data (mypt.finetune.run).
LR_FRACTION = 0.1
LORA_LR_FACTOR = 3
DEFAULTS = {"learning_rate": 1e-4, "weight_decay": 0.0}
