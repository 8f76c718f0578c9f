"""The engine's per-token logprobs ({token id: logprob}, top-k plus the sampled token) in
OpenAI's two shapes: completions (parallel lists) and chat (`content` entries with bytes).

Completions key each step's alternatives by token text. Tokens whose texts collide in one
step (distinct byte tokens that each decode to U+FFFD) are written as "token_id:N" instead, as
vLLM's `return_tokens_as_token_ids` writes every token, so no alternative is lost.
"""

from collections import Counter

from lora_jax.tokenizer import TextTokenizer


def token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


class CompletionLogprobs:
    """Completions `logprobs` for one choice, chunk by chunk: text_offset runs on across the
    chunks of a stream, as it counts characters from the start of the generated text."""

    def __init__(self, tokenizer: TextTokenizer, as_ids: bool = False):
        self.tok, self.offset, self.as_ids = tokenizer, 0, as_ids

    def _keys(self, step: dict[int, float]) -> dict[int, str]:
        """The key of each alternative of one step (the sampled token is one of them)."""
        if self.as_ids:
            return {i: token_id_text(i) for i in step}
        texts = {i: self.tok.token_text(i) for i in step}
        seen = Counter(texts.values())
        return {i: text if seen[text] == 1 else token_id_text(i) for i, text in texts.items()}

    def chunk(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        tokens, offsets, top = [], [], []
        for t, step in zip(token_ids, logprobs, strict=True):
            keys = self._keys(step)
            tokens.append(keys[t])
            top.append({keys[i]: lp for i, lp in step.items()})
            offsets.append(self.offset)
            self.offset += len(self.tok.token_text(t))
        return {"tokens": tokens, "token_logprobs": [step[t] for step, t in zip(
                    logprobs, token_ids, strict=True)],
                "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok: TextTokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  top_k: int, as_ids: bool = False) -> dict:
    """Chat `logprobs`: one entry per token with its top_k alternatives, most likely first."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tok.token_text(token_id)
        return {"token": token_id_text(token_id) if as_ids else text, "logprob": logprob,
                "bytes": list(text.encode("utf-8"))}

    content = []
    for t, step in zip(token_ids, logprobs, strict=True):
        best = sorted(step.items(), key=lambda kv: -kv[1])[:top_k]
        content.append({**entry(t, step[t]), "top_logprobs": [entry(i, lp) for i, lp in best]})
    return {"content": content}
