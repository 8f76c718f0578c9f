"""SamplingParams: how one request samples and when it stops. Imports no JAX."""

import enum
import math
import numbers

import msgspec


class RequestOutputKind(enum.IntEnum):
    """What step() reports for a running request, as in vLLM: everything so far, only what
    is new since the last report (streaming), or nothing until it finishes."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """vLLM's sampling parameters. temperature 0 is greedy; top_k -1 or 0 disables top-k.

    A `seed` makes the request reproducible whatever else shares its batch. Penalties as in
    vLLM: presence and frequency (in [-2, 2], on generated tokens), repetition (> 0, 1 = off,
    on prompt and generated tokens).
    `logprobs=k` returns, for each generated token, the top-k log-probabilities (plus the
    sampled token's). `min_tokens`, vLLM's rule (0 <= min_tokens <= max_tokens): until that
    many tokens are out, EOS and stop_token_ids cannot be sampled and stop strings are not
    looked for (at most MAX_HELD_TOKEN_IDS such ids). `logit_bias`: {token id: bias in
    [-100, 100]} added to the logits before penalties and sampling (OpenAI's; logprobs stay the
    model's, as vLLM reports them). Values are checked on construction and again when a
    request is added.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field of the wrong type or out of range."""
        self._check_types()
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got "
                             f"{self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        # The compiled step takes these as int32 inputs.
        if self.top_k > INT32_MAX:
            raise ValueError(f"top_k must be at most {INT32_MAX}, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        self._check_logit_bias()

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} "
                             f"{{token id: bias}} entries, got {bias!r:.80}")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got "
                                 f"{token!r:.40}")
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not -100 <= value <= 100):
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got "
                                 f"{value!r:.40} for token {token}")

    def _check_types(self) -> None:
        # msgspec does not type-check on construction: a bool would pass as an int, a float
        # would be truncated, and NaN slips past every range check (NaN < 0 is False).
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, list | tuple) or any(
                isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
                for t in ids)):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0 (token ids), "
                             f"got {ids!r:.80}")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_LOGPROBS = 20
# OpenAI's limit on logit_bias entries. Every row of a compiled step carries this many (token
# id, bias) pairs (8 bytes each), whether or not its request has a bias.
MAX_LOGIT_BIAS = 300
# Token ids min_tokens can hold off (the model's EOS ids and stop_token_ids): also a fixed-size
# per-row input of the compiled step.
MAX_HELD_TOKEN_IDS = 64
INT32_MAX = 2**31 - 1
_INT_FIELDS = ("n", "top_k", "max_tokens", "seed", "logprobs", "min_tokens")
_OPTIONAL = ("seed", "logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
