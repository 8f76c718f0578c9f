"""The engine's per-token logprobs ({token id: logprob}, top-k plus the sampled token) in
OpenAI's two shapes: completions (parallel lists) and chat (`content` entries with bytes)."""

from lora_jax.tokenizer import TextTokenizer


class CompletionLogprobs:
    """Completions `logprobs` for one choice, chunk by chunk: text_offset runs on across the
    chunks of a stream, as it counts characters from the start of the generated text."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tok, self.offset = tokenizer, 0

    def chunk(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        tokens, offsets = [], []
        for t in token_ids:
            text = self.tok.token_text(t)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        top = [{self.tok.token_text(i): lp for i, lp in step.items()} for step in logprobs]
        return {"tokens": tokens,
                "token_logprobs": [step[t] for step, t in zip(logprobs, token_ids, strict=True)],
                "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok: TextTokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  top_k: int) -> dict:
    """Chat `logprobs`: one entry per token with its top_k alternatives, most likely first."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tok.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for t, step in zip(token_ids, logprobs, strict=True):
        best = sorted(step.items(), key=lambda kv: -kv[1])[:top_k]
        content.append({**entry(t, step[t]), "top_logprobs": [entry(i, lp) for i, lp in best]})
    return {"content": content}
