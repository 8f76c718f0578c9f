"""Adapters: PEFT loading and validation, the CPU registry, device slots."""
