"""The token buckets a step is padded to: powers of two from MIN_TOKENS. Plain Python.

The worker compiles one program per bucket (lora_jax.worker.input_batch.ShapeLadder); the
scheduler fills a step up to a bucket rather than just past one (see Scheduler.schedule).
"""

# The smallest token bucket: a few padded tokens cost little next to another program.
MIN_TOKENS = 8


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= max(n, smallest): the padded size a batch dimension compiles at."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def bucket_below(n: int, smallest: int = MIN_TOKENS) -> int:
    """The largest power of two <= n (at least `smallest`)."""
    return max(smallest, 1 << (max(1, n).bit_length() - 1))
