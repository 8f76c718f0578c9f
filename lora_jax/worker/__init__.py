"""Device side: the runner, the jitted step, the sampler."""
