"""Access to the transformers + PEFT reference fixtures under tests/fixtures/reference/."""

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "reference"


class Reference:
    """One variant: its model folder, adapter folders, prompts, expected logits and greedy ids."""

    def __init__(self, variant: str):
        self.dir = ROOT / variant
        self.model = str(self.dir / "model")
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.expected = np.load(self.dir / "expected.npz")
        self.adapters = sorted(self.manifest["adapters"])

    def adapter_path(self, name: str) -> str:
        return str(self.dir / "adapters" / name)

    def prompt(self, j: int) -> list[int]:
        return self.expected[f"prompt_ids_{j}"].tolist()

    def logits(self, adapter: str, j: int) -> np.ndarray:
        return self.expected[f"logits_{adapter}_{j}"]

    def greedy(self, adapter: str, j: int) -> list[int]:
        return self.expected[f"greedy_{adapter}_{j}"].tolist()

    def greedy_logprobs(self, adapter: str, j: int) -> np.ndarray:
        """[new tokens, V] log-softmax of the logits that chose each greedy token (variants
        with greedy_logits only, e.g. `partial`)."""
        logits = self.expected[f"greedy_logits_{adapter}_{j}"].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    @property
    def num_prompts(self) -> int:
        return self.manifest["num_prompts"]
