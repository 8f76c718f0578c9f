"""Host-side serving core: scheduler, block pool. No JAX."""
