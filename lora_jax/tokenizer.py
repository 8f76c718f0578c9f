"""The model folder's tokenizer.json through the `tokenizers` library, with incremental decode."""

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextTokenizer:
    """Encodes prompts and decodes outputs; bos is added when the folder's config asks for it."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, add_bos: bool = True):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {str(path)!r}; pass tokenizer=... or "
                                    "prompts as {'prompt_token_ids': [...]}")
        self._tok = Tokenizer.from_file(str(file))
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

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
