"""The engine: requests in, outputs out, over the scheduler and the runner."""
