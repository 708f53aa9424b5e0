"""Fine-tuning a trained model: LoRA adapters applied from outside the model (lora)."""
