"""The lora-jax command line: argument parsing and error lines."""
