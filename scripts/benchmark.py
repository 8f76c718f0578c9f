"""Serving benchmark (same as `lora-jax bench`): prints a table and JSON.

    python scripts/benchmark.py --num-adapters 1 8 32 --max-loras 8 --compare-base
    python scripts/benchmark.py --num-adapters 4 --peer-peft   # needs the reference extra
"""

import sys

from lora_jax.tools.serving_bench import main

if __name__ == "__main__":
    sys.exit(main())
