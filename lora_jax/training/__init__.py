"""Training LoRA adapters in JAX and saving them as PEFT."""
