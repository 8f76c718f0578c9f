"""One model served from several processes: jax.distributed, with process 0 driving each step.

Every process holds its devices' shards and runs the same compiled programs (JAX's
multi-controller model); only process 0 schedules, tokenizes and serves. Before each device
call process 0 broadcasts what the others need to make the same call: a header (what kind of
call, its shape key) and then the call's host arrays, both through
`multihost_utils.broadcast_one_to_all` (a collective over the devices: no channel of our own).
The followers sit in `EngineCore.follow`, which mirrors those calls until process 0 stops;
a step's arrays go as the runner's `StepInputs` record (a named pytree), never as tuple positions.
"""

from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

# Header kinds: a ragged step, an adapter slot fill, the end of one LLM.generate, shutdown, and
# a keep-alive an idle leader sends (a follower waits inside a collective, which times out).
STEP, FILL, DONE, STOP, ALIVE = 1, 2, 3, 4, 5
HEADER = 4  # kind + up to three integers
# An idle leader sends ALIVE this often: well inside XLA's CPU collective timeout
# (--xla_cpu_collective_timeout_seconds), which a follower's wait for the next header is under.
KEEPALIVE_S = 10.0
# A process that stops sending heartbeats for this long is declared dead by JAX's coordination
# service, which then ends every other process (JAX's much longer default leaves a leader
# serving nothing meanwhile); and how long exiting waits for the others.
HEARTBEAT_S, SHUTDOWN_S = 10, 30


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: JAX's coordinator (process 0's HOST:PORT), the number of
    processes and this one's index."""

    coordinator_address: str
    num_processes: int
    process_id: int

    def __post_init__(self):
        if not isinstance(self.coordinator_address, str) or ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address must be 'HOST:PORT' (process 0's), got "
                             f"{self.coordinator_address!r}")
        for name in ("num_processes", "process_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} must be below num_processes "
                             f"{self.num_processes}")

    def initialize(self) -> None:
        """jax.distributed.initialize, once; it must come before JAX touches a device."""
        if jax.distributed.is_initialized():
            return
        try:
            jax.distributed.initialize(self.coordinator_address, self.num_processes,
                                       self.process_id, heartbeat_timeout_seconds=HEARTBEAT_S,
                                       shutdown_timeout_seconds=SHUTDOWN_S)
        except RuntimeError as err:
            raise ValueError(f"jax.distributed.initialize failed ({err}); it must run before "
                             "anything in this process uses JAX devices, and every process "
                             "needs the same coordinator address") from err


class StepChannel:
    """Process 0 sends, the others receive, in the same order on every process."""

    def __init__(self):
        self.leader = jax.process_index() == 0

    def send(self, kind: int, values: tuple[int, ...] = (), tree=None):
        """Leader: broadcast a header and (optionally) a tree of host arrays; returns the tree
        as every process now holds it (numpy)."""
        self._header(kind, values)
        return None if tree is None else self._tree(tree)

    def send_fill(self, slot: int, packed):
        return self.send(FILL, (slot,), packed)

    def receive_header(self) -> tuple[int, tuple[int, ...]]:
        header = self._header(0, ())
        return int(header[0]), tuple(int(v) for v in header[1:])

    def receive(self, template):
        """Follower: the tree process 0 sent; `template` gives its structure, shapes, dtypes."""
        return self._tree(template)

    def _header(self, kind: int, values: tuple[int, ...]) -> np.ndarray:
        header = np.zeros(HEADER, np.int64)
        header[0], header[1:1 + len(values)] = kind, values
        return np.asarray(multihost_utils.broadcast_one_to_all(header, is_source=self.leader))

    def _tree(self, tree):
        host = jax.tree.map(np.asarray, tree)
        out = multihost_utils.broadcast_one_to_all(host, is_source=self.leader)
        return jax.tree.map(lambda t, x: np.asarray(x, t.dtype), host, out)
