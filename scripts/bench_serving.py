"""Serving benchmark against a running server (same as `lora-jax bench --serve URL ...`).

    python scripts/bench_serving.py --serve http://127.0.0.1:8000 --num-requests 64 \\
        --max-concurrency 8 --output-len 32 --plot serving.png

`--write-bench-adapters DIR N [tiny]` writes the bench model (or, with `tiny`, the tiny
character-level Llama of lora_jax/tools/tiny.py, random weights, max length 256) and N random
rank-16 PEFT adapters under DIR, prints the `lora-jax serve` command for them, and exits.
"""

import sys
from pathlib import Path

from lora_jax.tools.serving_bench import main


def write_bench_adapters(folder: Path, count: int, tiny: bool = False, rank: int = 16) -> None:
    from flax import nnx

    from lora_jax.lora.adapters import save_adapter
    from lora_jax.tools.tiny import char_tokenizer, save_llama, tiny_config
    from lora_jax.tools.workload import BENCH_CONFIG, ensure_bench_model, random_adapter
    from models import Llama

    if tiny:
        config = tiny_config(max_position_embeddings=256)
        model = save_llama(Llama(config, rngs=nnx.Rngs(0)), folder / "model", char_tokenizer())
    else:
        config, model = BENCH_CONFIG, ensure_bench_model(folder / "model")
    mods = []
    for i in range(count):
        save_adapter(random_adapter(config, rank, seed=i), folder / f"b{i}")
        mods.append(f"b{i}={folder / f'b{i}'}")
    print(f"lora-jax serve {model} --enable-lora --max-loras {min(count, 8)} "
          f"--max-lora-rank {rank} --lora-modules {' '.join(mods)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-bench-adapters"]:
        write_bench_adapters(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:5] == ["tiny"])
        sys.exit(0)
    sys.exit(main())
