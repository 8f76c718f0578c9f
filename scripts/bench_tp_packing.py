"""q|k|v under tensor parallelism (2 forced CPU devices): one shard-major packed matmul split
per shard (what models.sharding does) against three separate column-split matmuls, each
followed by an elementwise consumer as in the layer. Prints JSON per token count.

    PYTHONPATH=$PWD python scripts/bench_tp_packing.py 32 256
"""

import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from models.layers import split_packed  # noqa: E402
from models.sharding import interleave  # noqa: E402

D, H, KV, HD = 1024, 16, 4, 64  # the bench model's attention
WIDTHS = (H * HD, KV * HD, KV * HD)


def _use(parts):
    return [jnp.tanh(p) for p in parts]  # what the layer does next, fused into the split


def _time(f, *args, rounds: int = 30) -> dict:
    start = time.perf_counter()
    f = f.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return {"compile_s": round(compile_s, 3), "min_ms": round(1e3 * min(times), 3),
            "median_ms": round(1e3 * float(np.median(times)), 3)}


def bench(tokens: int) -> dict:
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("tp",))
    col, rep = NamedSharding(mesh, P(None, "tp")), NamedSharding(mesh, P())
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((D, w)).astype(np.float32) for w in WIDTHS)
    x = jax.device_put(rng.standard_normal((tokens, D)).astype(np.float32), rep)
    packed = jax.device_put(interleave([q, k, v], 2), col)
    separate = [jax.device_put(w, col) for w in (q, k, v)]
    f_packed = jax.jit(lambda x, w: _use(split_packed(jnp.dot(x, w), WIDTHS, 2)))
    f_separate = jax.jit(lambda x, ws: _use([jnp.dot(x, w) for w in ws]))
    out = {"tokens": tokens, "packed": _time(f_packed, x, packed),
           "separate": _time(f_separate, x, separate)}
    for a, b in zip(f_packed(x, packed), f_separate(x, separate), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    return out


if __name__ == "__main__":
    for count in map(int, sys.argv[1:] or ["32", "256"]):
        print(json.dumps(bench(count)))
