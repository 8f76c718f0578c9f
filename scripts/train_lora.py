"""Train LoRA adapters on a base model folder and save them in the PEFT format.

    python scripts/train_lora.py --model BASE --data NAME=FILE [--data NAME=FILE ...] --out DIR

Same as `lora-jax train`; see lora_jax/cli/train.py for the options (or --help).
"""

import sys

from lora_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
