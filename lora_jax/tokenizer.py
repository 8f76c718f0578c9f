"""The model folder's tokenizer.json through the `tokenizers` library, with incremental decode."""

from pathlib import Path

from tokenizers import Tokenizer


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
