"""Adapters: PEFT loading and validation, the CPU registry, device slots, and the manager over
them (add, reload, remove, pin, versions)."""
