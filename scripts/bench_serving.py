"""Serving benchmark against a running server (same as `lora-jax bench --serve URL ...`).

    python scripts/bench_serving.py --serve http://127.0.0.1:8000 --num-requests 64 \\
        --max-concurrency 8 --output-len 32 --plot serving.png

`--write-bench-adapters DIR N` writes the bench model and N random rank-16 PEFT adapters under
DIR (for `lora-jax serve DIR/model --enable-lora --lora-modules b0=DIR/b0 ...`) and exits.
"""

import sys
from pathlib import Path

from lora_jax.tools.serving_bench import main


def write_bench_adapters(folder: Path, count: int, rank: int = 16) -> None:
    from lora_jax.lora.adapters import save_adapter
    from lora_jax.tools.serving_bench import BENCH_CONFIG, ensure_bench_model, random_adapter

    model = ensure_bench_model(folder / "model")
    mods = []
    for i in range(count):
        save_adapter(random_adapter(BENCH_CONFIG, rank, seed=i), folder / f"b{i}")
        mods.append(f"b{i}={folder / f'b{i}'}")
    print(f"lora-jax serve {model} --enable-lora --max-loras {min(count, 8)} "
          f"--max-lora-rank {rank} --lora-modules {' '.join(mods)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-bench-adapters"]:
        write_bench_adapters(Path(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
