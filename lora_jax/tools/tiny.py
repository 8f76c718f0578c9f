"""A small Llama made from scratch: a character-level tokenizer, a config, full-weight
pretraining, and writing it out as a Hugging Face model folder that load_llama and the LLM read.
"""

import json
import string
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from lora_jax.progress import progress_bar
from lora_jax.training.datasets import Example, make_batch, shuffled_rows
from lora_jax.training.trainer import token_losses
from models import Llama, LlamaConfig

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos, eos
CHARACTERS = "".join(c for c in string.printable if c.isprintable())  # the 95 of ASCII 32..126


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (ids 3..97) after <unk>, <s>, </s>."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(sorted(CHARACTERS))})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return tokenizer


def tiny_config(*, hidden_size: int = 64, num_hidden_layers: int = 2,
                num_attention_heads: int = 4, max_position_embeddings: int = 64) -> LlamaConfig:
    """A Llama with the char tokenizer's ids (vocab padded to 128), bos 1, eos 2."""
    return LlamaConfig(
        hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads // 2, head_dim=hidden_size // num_attention_heads,
        vocab_size=128, rms_norm_eps=1e-5, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2)


def pretrain(model: Llama, examples: Sequence[Example], *, steps: int, batch_size: int,
             seq_len: int, learning_rate: float = 3e-3, seed: int = 0,
             progress: bool = True) -> Llama:
    """Full-weight AdamW on the completion tokens of `examples` -> the trained model."""
    graphdef, state = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps,
                                                  end_value=learning_rate / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=0.01))

    def step(state, opt_state, batch):
        def loss(s):
            losses = token_losses(nnx.merge(graphdef, s), None, batch)
            return losses.sum() / jnp.maximum(batch.weights.sum(), 1.0)

        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    step = jax.jit(step, donate_argnums=(0, 1))
    opt_state = optimizer.init(state)
    rows = shuffled_rows(examples, batch_size, 0, seed)
    bar = progress_bar(range(steps), desc="pretrain base", disable=not progress)
    for _ in bar:
        state, opt_state, loss = step(state, opt_state, make_batch(next(rows), seq_len))
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return nnx.merge(graphdef, state)


def config_dict(config: LlamaConfig) -> dict:
    """The config.json of a Hugging Face LlamaForCausalLM with this shape."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
            "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "torch_dtype")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            **{k: getattr(config, k) for k in keys}}


def save_llama(model: Llama, folder: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json + model.safetensors (HF names, linear weights [out, in], float32)
    and tokenizer.json when given: the folder load_llama and LLM(model=folder) read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), nnx.state(model))
    layers = host["layers"]
    proj = config.projection_shapes()
    tensors = {"model.embed_tokens.weight": host["embed"][...],
               "model.norm.weight": host["norm"][...]}
    if model.lm_head is not None:
        tensors["lm_head.weight"] = host["lm_head"][...]
    packed = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
              "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = layers[i]["attn_norm"][...]
        tensors[prefix + "post_attention_layernorm.weight"] = layers[i]["mlp_norm"][...]
        for param, (parent, names) in packed.items():
            weight, start = layers[i][param][...], 0
            for name in names:
                width = proj[name][1]
                tensors[f"{prefix}{parent}.{name}.weight"] = weight[start:start + width]
                start += width
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(
        config_dict(config) | {"torch_dtype": "float32"}, indent=2))
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder
