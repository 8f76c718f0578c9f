"""The model folder's tokenizer.json through the `tokenizers` library, with incremental decode.

encode and decode go through the library's batch calls, which release the GIL: a long prompt
tokenized in a worker thread does not stall the server's event loop or the engine thread.
"""

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def config_adds_bos(folder: Path) -> bool:
    """Whether transformers' tokenizer for this folder puts bos first: tokenizer_config.json's
    add_bos_token where given; no bos where it sets bos_token to null (Qwen); else yes."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    return not ("bos_token" in config and config["bos_token"] is None)


class TextTokenizer:
    """Encodes prompts and decodes outputs; bos is added when the folder's config asks for it
    (a model's bos id, and its tokenizer_config.json does not turn it off)."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, add_bos: bool = True):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {str(path)!r}; pass tokenizer=... or "
                                    "prompts as {'prompt_token_ids': [...]}")
        self._tok = Tokenizer.from_file(str(file))
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None and config_adds_bos(file.parent)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode_batch([ids], skip_special_tokens=True)[0]

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """An upper bound on the characters of text one token can stand for, or None where the
        tokenizer's parts allow no such bound (a normalizer or pre-tokenizer that drops text,
        an unknown token that swallows any run of characters). A text of more than
        max_chars_per_token * n characters is certainly more than n tokens."""
        spec = json.loads(self._tok.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or (model.get("unk_token") is not None
                                          and model.get("fuse_unk")):
            return None
        if not _keeps_every_char(spec.get("normalizer"), _NORMALIZERS) or not _keeps_every_char(
                spec.get("pre_tokenizer"), _PRE_TOKENIZERS):
            return None
        # A byte-level vocabulary writes one character per byte: never fewer than the text's.
        strings = [*model.get("vocab", {}), *(t.get("content", "") for t in
                                              spec.get("added_tokens") or [])]
        return max(1, *(len(s) for s in strings))

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (for logprobs); an id the vocabulary
        lacks (a model's padded vocab) is "token_id:N", as vLLM writes ids, so that no two
        alternatives share a name."""
        if self._tok.id_to_token(token_id) is None:
            return f"token_id:{token_id}"
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_string(self, token_id: int | None) -> str | None:
        """The vocabulary string of a token id ("<s>"), or None (for chat templates)."""
        return None if token_id is None else self._tok.id_to_token(token_id)

    def stream(self) -> "TextStream":
        """An incremental decoder for one output: each token costs O(1), not a re-decode."""
        return TextStream(self._tok)


class TextStream:
    """The text of a growing output, one token at a time (tokenizers' DecodeStream buffers the
    tokens of a character split across several, such as multi-byte UTF-8)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok, self._stream, self.text = tokenizer, DecodeStream(skip_special_tokens=True), ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completed ("" while a character is partial)."""
        piece = self._stream.step(self._tok, token_id) or ""
        self.text += piece
        return piece


# Normalizers and pre-tokenizers that never remove or merge characters of the input.
_NORMALIZERS = {"Prepend", "NFD"}
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split"}


def _keeps_every_char(part: dict | None, allowed: set[str]) -> bool:
    if part is None:
        return True
    if part.get("type") == "Sequence":
        children = part.get("normalizers") or part.get("pretokenizers") or []
        return all(_keeps_every_char(c, allowed) for c in children)
    if part.get("type") == "Split" and part.get("behavior") == "Removed":
        return False
    if part.get("type") == "Replace":  # one character for one (Llama's " " -> "▁")
        return len(part.get("pattern", {}).get("String") or "") == 1 and bool(part.get("content"))
    return part.get("type") in allowed
