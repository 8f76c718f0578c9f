"""POST /tokenize and /detokenize (vLLM's): the model's tokenizer, off the event loop."""

import asyncio
import json

from fastapi import APIRouter, Request, Response

from lora_jax.entrypoints.openai.protocol import APIError, DetokenizeRequest, TokenizeRequest

router = APIRouter()


def _tokenizer(raw: Request, model: str | None):
    state = raw.app.state
    if model is not None:
        state.models.resolve(model)  # 404 for a model not served
    tok = state.llm.engine.get_tokenizer()
    if tok is None:
        raise APIError("this model folder has no tokenizer.json", 400)
    return tok


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, raw: Request):
    tok = _tokenizer(raw, req.model)
    max_model_len = raw.app.state.llm.engine.max_model_len

    def work() -> bytes:  # a long prompt's ids are serialized off the loop too
        ids = tok.encode(req.prompt)
        return json.dumps({"tokens": ids, "count": len(ids),
                           "max_model_len": max_model_len}).encode()

    return Response(await asyncio.to_thread(work), media_type="application/json")


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, raw: Request):
    tok = _tokenizer(raw, req.model)
    vocab = raw.app.state.completions.vocab_size
    bad = [t for t in req.tokens if t >= vocab]
    if bad:
        raise APIError(f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})",
                       param="tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, req.tokens)}
