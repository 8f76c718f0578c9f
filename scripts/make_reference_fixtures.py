"""Write transformers + PEFT reference fixtures that lora-jax's tests compare against.

The tests never import torch: this script runs Hugging Face transformers + PEFT on CPU once and
leaves tiny float32 checkpoints, adapters and expected logits / greedy tokens on disk.

Regenerate (in a venv of its own, so the dev venv stays torch-free; pin torch to the CPU wheel):

    pip install torch==2.13.0 transformers peft safetensors numpy
    python scripts/make_reference_fixtures.py            # --out tests/fixtures/reference

Layout per variant (gqa, tied, llama3, long_lora, partial): model/, adapters/<name>/, expected.npz,
manifest.json. The array names are documented in tests/fixtures/reference/README.md.

The `trained` case holds adapters that lora-jax itself trained (scripts/train_lora.py on the gqa
base model; the command is in the README there): this script only loads them into PEFT and
writes trained/expected.npz and trained/manifest.json, so it never touches the adapters.
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

GREEDY_NEW_TOKENS = 8
LONG_LORA_MAX_LEN = 64
BOS = 1

BASE_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                   max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all_r4": dict(r=4, lora_alpha=8, target_modules=ALL),
    "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "mlp_rslora": dict(r=2, lora_alpha=4, use_rslora=True,
                       target_modules=["gate_proj", "up_proj", "down_proj"]),
    # PEFT fullmatches a regex string against the module path ("model.layers.0.self_attn.q_proj").
    "patterns": dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|o_proj|down_proj)",
                     rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 32}),
}
# Adapters that cover only some layers of the 4-layer `partial` base, each by another PEFT rule.
PARTIAL_ADAPTERS = {
    "regex_layers": dict(r=4, lora_alpha=8, target_modules=(
        r".*\.layers\.[0-2]\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)")),
    "layers_pattern": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj",
                                                               "up_proj"],
                           layers_to_transform=[1, 3], layers_pattern="layers",
                           rank_pattern={"layers.3.self_attn.q_proj": 2}),
    "one_layer": dict(r=2, lora_alpha=4, target_modules=ALL, layers_to_transform=2),
    "excluded": dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "down_proj"],
                     exclude_modules=r".*\.layers\.[13]\.mlp\..*"),
    # PEFT saves all-linear expanded to module names; the config is rewritten to the shorthand
    # after saving, and PEFT's reload of that folder must equal the in-memory adapter.
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear",
                       exclude_modules=["model.layers.0.self_attn.k_proj", "mlp.up_proj"],
                       saved_target_modules="all-linear"),
}
VARIANTS = {
    "gqa": dict(config={}, adapters={k: ADAPTERS[k] for k in ADAPTERS}, lengths=[5, 9, 12]),
    # MQA + a head_dim (16) that is not hidden/heads (8): q/o are 32<->64, k/v 32->16.
    "tied": dict(config=dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=16),
                 adapters={k: ADAPTERS[k] for k in ("all_r4", "qv_r8")}, lengths=[5, 9, 12]),
    "llama3": dict(config=dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
        adapters={k: ADAPTERS[k] for k in ("all_r4", "qv_r8")}, lengths=[5, 9, 12]),
    # Prompts longer than max_position_embeddings; expected numbers use linear rope scaling.
    "long_lora": dict(config=dict(max_position_embeddings=32),
                      adapters={"long": ADAPTERS["all_r4"]}, lengths=[40, 56], long=True),
    # 4 layers; adapters for only some of them beside full-layer ones; also the logits along
    # each greedy path (greedy_logits), for the generated tokens' logprobs.
    "partial": dict(config=dict(num_hidden_layers=4),
                    adapters={"all_r4": ADAPTERS["all_r4"], "qv_r8": ADAPTERS["qv_r8"],
                              **PARTIAL_ADAPTERS}, lengths=[5, 9, 12], greedy_logits=True),
}
# The model families beside Llama (lora-jax's models.families): each family's own config
# fields at tiny sizes, sliding windows (4-6) shorter than the prompts (5, 9, 12 tokens).
FAMILY_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                   max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {
    "mistral": dict(head_dim=16, sliding_window=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                  tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
                   tie_word_embeddings=True),
    "gemma3_text": dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=4, sliding_window_pattern=2, tie_word_embeddings=True,
                        rope_parameters={
                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                               "rope_theta": 10000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    # max_position_embeddings / original = 4 (attention factor sqrt(1 + ln 4 / ln 32)); the
    # served prompts stay within 32 positions (short factors), and `long_prompt` (40 tokens)
    # goes past them: transformers then rotates every position by the long factors.
    "phi3": dict(max_position_embeddings=128, original_max_position_embeddings=32,
                 sliding_window=6, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0,
                     "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.0, 3.0, 4.0]}),
}
FAMILY_ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all_rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
                       saved_target_modules="all-linear"),
}
FAMILY_SEEDS = {name: 20 + k for k, name in enumerate(FAMILIES)}
# Gemma 3 scales its tied embeddings by sqrt(hidden) without Gemma 2's final soft-cap: at the
# default spread each token's own embedding wins every step (the model repeats its input).
FAMILY_EMBED_STD = {"gemma3_text": 0.1}
# Each variant's seed offset, fixed so that adding a variant never changes another's files.
SEED_OFFSETS = {"gqa": 1, "tied": 2, "llama3": 3, "long_lora": 4, "trained": 5, "partial": 6}


def make_config(overrides: dict) -> LlamaConfig:
    kwargs = {**BASE_CONFIG, **overrides}
    # transformers >= 5 keeps rope_theta and rope_scaling together in `rope_parameters`.
    rope = {"rope_type": "default", **kwargs.pop("rope_scaling", {})}
    rope["rope_theta"] = kwargs.pop("rope_theta")
    return LlamaConfig(**kwargs, rope_parameters=rope)


@torch.no_grad()
def randomize_base(model: LlamaForCausalLM, seed: int, embed_std: float = 0.5) -> None:
    """Re-draw every weight: HF's init (std 0.02, norms exactly 1) would hide norm/scale bugs."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
        elif "embed_tokens" in name:
            param.copy_(embed_std * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):  # Qwen2's q/k/v biases: non-zero, so a lost bias shows
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        else:  # Linear [out, in]: unit-variance outputs keep logits O(1) and greedy margins wide.
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))


def load_base(model_dir: Path, config=None):
    extra = {"config": config} if config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager", **extra)
    return model.eval()


@torch.no_grad()
def full_logits(model, ids: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None])
    return out.logits[0].float().numpy()


@torch.no_grad()
def greedy(model, ids: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Exactly GREEDY_NEW_TOKENS tokens (min_new_tokens masks EOS), the smallest top-1/top-2
    logit gap on the path, and the logits [GREEDY_NEW_TOKENS, V] that chose each token,
    re-derived by a full forward pass (checks the KV-cache path too)."""
    prompt = torch.from_numpy(ids.astype(np.int64))[None]
    seq = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS,
                         min_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=0)[0].numpy()
    new = seq[len(ids):]
    logits = full_logits(model, seq[:-1])[len(ids) - 1:]
    warn_unless(np.array_equal(logits.argmax(-1), new),
                f"generate() disagrees with the full-forward argmax: {new}")
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return new.astype(np.int32), float((top2[:, 1] - top2[:, 0]).min()), logits


@torch.no_grad()
def make_adapter(model_dir: Path, out: Path, spec: dict, seed: int, prompts) -> list[np.ndarray]:
    """Build a PEFT adapter with random non-zero A and B, save it, return its in-memory logits."""
    spec = dict(spec)
    saved_targets = spec.pop("saved_target_modules", None)
    model = get_peft_model(load_base(model_dir),
                           LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **spec))
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        # PEFT's default init zeroes B, which would make the adapter a no-op.
        if "lora_A" in name or "lora_B" in name:
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    canonicalize_adapter_folder(out, saved_targets)
    return [full_logits(model, p) for p in prompts]


def canonicalize_adapter_folder(adapter_dir: Path, target_modules=None) -> None:
    """PEFT writes target_modules (and exclude_modules) from a Python set, so its order follows
    the per-process string hash seed: sort it so reruns are byte-identical. Drop the boilerplate
    model card too. target_modules, when given, replaces the saved one (e.g. "all-linear")."""
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if target_modules is not None:
        cfg["target_modules"] = target_modules
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (adapter_dir / "README.md").unlink(missing_ok=True)


def saved_adapter_entry(adapter_dir: Path) -> dict:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    entry = {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": cfg["use_rslora"],
             "target_modules": cfg["target_modules"],
             "rank_pattern": cfg["rank_pattern"], "alpha_pattern": cfg["alpha_pattern"]}
    # Only partial-layer adapters set these; the other variants' manifests stay as they were.
    entry.update({k: cfg[k] for k in ("layers_to_transform", "layers_pattern", "exclude_modules")
                  if cfg.get(k) is not None})
    return entry


def warn_unless(ok: bool, message: str) -> None:
    # Print, don't raise: a failed check should still leave the fixtures to inspect.
    if not ok:
        print(f"    CHECK FAILED: {message}")


def make_prompts(lengths: list[int], vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(3, vocab, n - 1)]).astype(np.int32)
            for n in lengths]


def build_variant(name: str, spec: dict, out: Path, seed: int) -> None:
    print(f"== {name}")
    vdir = out / name
    shutil.rmtree(vdir, ignore_errors=True)
    config = make_config(spec["config"])
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(torch.float32)
    randomize_base(base, seed)
    base.save_pretrained(vdir / "model", safe_serialization=True)
    prompts = make_prompts(spec["lengths"], config.vocab_size, seed)
    arrays = {f"prompt_ids_{j}": p for j, p in enumerate(prompts)}
    manifest = {"variant": name, "adapters": {}, "num_prompts": len(prompts),
                "prompt_lengths": spec["lengths"], "greedy_new_tokens": GREEDY_NEW_TOKENS,
                # Smallest top-1/top-2 logit gap along each greedy path: a test comparing greedy
                # tokens needs its numeric error to stay below this.
                "greedy_min_gap": {}}
    long = spec.get("long", False)
    eval_config = None
    if long:
        # LongLoRA-style serving: linear rope scaling by ceil(max_len / trained context), applied
        # at run time only -- the saved base config.json stays plain.
        factor = float(math.ceil(LONG_LORA_MAX_LEN / config.max_position_embeddings))
        eval_config = LlamaConfig.from_pretrained(vdir / "model")
        eval_config.rope_parameters = {"rope_type": "linear", "factor": factor,
                                       "rope_theta": config.rope_parameters["rope_theta"]}
        manifest.update(long_lora_max_len=LONG_LORA_MAX_LEN, linear_factor=factor)
        del manifest["greedy_min_gap"]

    plain = load_base(vdir / "model")
    base_model = load_base(vdir / "model", eval_config) if long else plain
    base_logits = [full_logits(base_model, p) for p in prompts]
    for j, p in enumerate(prompts):
        arrays[f"logits_base_{j}"] = base_logits[j]
        if long:
            scaled_diff = np.abs(base_logits[j] - full_logits(plain, p)).max()
            warn_unless(scaled_diff > 1e-2, f"{name}/base: rope scaling had no effect")
            print(f"  base prompt {j}: max|scaled - unscaled| = {scaled_diff:.3f}")
        else:
            arrays[f"greedy_base_{j}"], margin, path_logits = greedy(base_model, p)
            if spec.get("greedy_logits"):
                arrays[f"greedy_logits_base_{j}"] = path_logits
            manifest["greedy_min_gap"].setdefault("base", []).append(round(margin, 6))
            print(f"  base prompt {j}: greedy {arrays[f'greedy_base_{j}'].tolist()} "
                  f"min top-2 gap {margin:.3f}")

    for k, (aname, aspec) in enumerate(spec["adapters"].items()):
        adir = vdir / "adapters" / aname
        in_memory = make_adapter(vdir / "model", adir, aspec, seed * 100 + k, prompts)
        # Expected numbers come from a fresh reload of the SAVED folder: that proves the files.
        model = PeftModel.from_pretrained(load_base(vdir / "model", eval_config), adir).eval()
        reload_plain = model
        if long:  # the in-memory adapter ran unscaled: compare the reload on equal terms
            reload_plain = PeftModel.from_pretrained(load_base(vdir / "model"), adir).eval()
        manifest["adapters"][aname] = saved_adapter_entry(adir)
        for j, p in enumerate(prompts):
            logits = arrays[f"logits_{aname}_{j}"] = full_logits(model, p)
            with model.disable_adapter():
                disabled_diff = np.abs(full_logits(model, p) - base_logits[j]).max()
            effect = np.abs(logits - base_logits[j]).max()
            reload_diff = np.abs(full_logits(reload_plain, p) - in_memory[j]).max()
            warn_unless(effect > 1e-2, f"{name}/{aname}: adapter barely changes the logits")
            warn_unless(reload_diff == 0, f"{name}/{aname}: reload differs from in-memory")
            warn_unless(disabled_diff == 0, f"{name}/{aname}: disabled adapter != base")
            line = (f"  {aname} prompt {j}: max|adapter - base| = {effect:.3f}, "
                    f"reload diff {reload_diff:.1e}, disabled-vs-base {disabled_diff:.1e}")
            if long:
                scaled_diff = np.abs(logits - in_memory[j]).max()
                warn_unless(scaled_diff > 1e-2, f"{name}/{aname}: rope scaling had no effect")
                line += f", scaled-vs-unscaled {scaled_diff:.3f}"
            else:
                arrays[f"greedy_{aname}_{j}"], margin, path_logits = greedy(model, p)
                if spec.get("greedy_logits"):
                    arrays[f"greedy_logits_{aname}_{j}"] = path_logits
                manifest["greedy_min_gap"].setdefault(aname, []).append(round(margin, 6))
                line += f", min top-2 gap {margin:.3f}"
            print(line)

    manifest["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                            "torch": torch.__version__}
    np.savez_compressed(vdir / "expected.npz", **arrays)
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@torch.no_grad()
def greedy_generate(model, ids: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """As greedy(), but the logits are generate()'s own (each step through the KV cache): with
    longrope, a full forward pass past the original context would re-rotate every position."""
    prompt = torch.from_numpy(ids.astype(np.int64))[None]
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS,
                         min_new_tokens=GREEDY_NEW_TOKENS, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].numpy()
    logits = torch.stack(out.logits, dim=1)[0].float().numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    gap = float((top2[:, 1] - top2[:, 0]).min())
    # A path where min_new_tokens had to mask EOS is no use: a server would stop there.
    return new.astype(np.int32), gap if np.array_equal(logits.argmax(-1), new) else 0.0, logits


LONGROPE_PROMPT = 40  # Phi-3's long prompt: past original_max_position_embeddings (32)
PROMPT_CANDIDATES = 40  # random prompts tried per length; the widest greedy margins win


def pick_prompts(models: dict, lengths: list[int], vocab: int, seed: int) -> list[np.ndarray]:
    """Per length, of PROMPT_CANDIDATES random prompts the one whose smallest top-1/top-2 gap
    along every model's greedy path is widest (a bfloat16 run then meets no near-tie), among
    those where every adapter's greedy tokens differ from the base model's."""
    rng, chosen = np.random.default_rng(seed), []
    for n in lengths:
        best, best_gap = None, -2.0
        for _ in range(PROMPT_CANDIDATES):
            p = np.concatenate([[BOS], rng.integers(3, vocab, n - 1)]).astype(np.int32)
            runs = {name: greedy_generate(m, p)[:2] for name, m in models.items()}
            same = any(np.array_equal(runs[name][0], runs["base"][0]) for name in runs
                       if name != "base")
            gap = min(g for _, g in runs.values()) - (1.0 if same else 0.0)
            if gap > best_gap:
                best, best_gap = p, gap
        chosen.append(best)
    return chosen


def build_family(model_type: str, out: Path, seed: int) -> None:
    """One family: base + a q/v adapter + an rsLoRA adapter on every linear layer."""
    print(f"== {model_type}")
    vdir = out / model_type
    shutil.rmtree(vdir, ignore_errors=True)
    config = AutoConfig.for_model(model_type, **{**FAMILY_BASE, **FAMILIES[model_type]})
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_base(base.to(torch.float32), seed, FAMILY_EMBED_STD.get(model_type, 0.5))
    base.save_pretrained(vdir / "model", safe_serialization=True)
    lengths = [5, 9, 12]
    probes = make_prompts(lengths, config.vocab_size, seed)
    manifest = {"variant": model_type, "adapters": {}, "num_prompts": len(lengths),
                "prompt_lengths": lengths, "greedy_new_tokens": GREEDY_NEW_TOKENS,
                "greedy_min_gap": {}}
    models = {"base": load_base(vdir / "model")}
    for k, (aname, aspec) in enumerate(FAMILY_ADAPTERS.items()):
        aspec = dict(aspec)
        if model_type == "phi3" and aname == "qv":  # Phi-3's q, k and v are one module
            aspec["target_modules"] = ["qkv_proj"]
        adir = vdir / "adapters" / aname
        in_memory = make_adapter(vdir / "model", adir, aspec, seed * 100 + k, probes)
        models[aname] = PeftModel.from_pretrained(load_base(vdir / "model"), adir).eval()
        manifest["adapters"][aname] = saved_adapter_entry(adir)
        for j, p in enumerate(probes):
            diff = np.abs(full_logits(models[aname], p) - in_memory[j]).max()
            warn_unless(diff == 0, f"{model_type}/{aname}: reload differs from in-memory")
    prompts = pick_prompts(models, lengths, config.vocab_size, seed + 1)
    arrays = {f"prompt_ids_{j}": p for j, p in enumerate(prompts)}
    for aname, model in models.items():
        for j, p in enumerate(prompts):
            arrays[f"logits_{aname}_{j}"] = full_logits(model, p)
            tokens, margin, logits = greedy_generate(model, p)
            warn_unless(margin > 0, f"{model_type}/{aname} prompt {j}: EOS on the greedy path")
            arrays[f"greedy_{aname}_{j}"], arrays[f"greedy_logits_{aname}_{j}"] = tokens, logits
            manifest["greedy_min_gap"].setdefault(aname, []).append(round(margin, 6))
            effect = np.abs(arrays[f"logits_{aname}_{j}"] - arrays[f"logits_base_{j}"]).max()
            warn_unless(aname == "base" or effect > 1e-2, f"{model_type}/{aname}: no effect")
            print(f"  {aname} prompt {j}: greedy {tokens.tolist()} min top-2 gap {margin:.3f}"
                  f" max|adapter - base| {effect:.3f}")
    if model_type == "phi3":
        long = make_prompts([LONGROPE_PROMPT], config.vocab_size, seed + 2)[0]
        arrays["prompt_ids_long"] = long
        for aname, model in models.items():
            arrays[f"logits_long_{aname}"] = full_logits(model, long)
    manifest["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                            "torch": torch.__version__}
    np.savez_compressed(vdir / "expected.npz", **arrays)
    (vdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


TRAINED_LENGTHS = [5, 9, 12]


def build_trained(out: Path, seed: int) -> None:
    """PEFT's logits for every adapter lora-jax trained under trained/adapters/, gqa base."""
    print("== trained")
    tdir, base_dir = out / "trained", out / "gqa" / "model"
    base = load_base(base_dir)
    prompts = make_prompts(TRAINED_LENGTHS, base.config.vocab_size, seed)
    arrays = {f"prompt_ids_{j}": p for j, p in enumerate(prompts)}
    base_logits = [full_logits(base, p) for p in prompts]
    arrays.update({f"logits_base_{j}": logits for j, logits in enumerate(base_logits)})
    manifest = {"variant": "trained", "base_model": "../gqa/model", "adapters": {},
                "num_prompts": len(prompts), "prompt_lengths": TRAINED_LENGTHS}
    for adir in sorted(p for p in (tdir / "adapters").iterdir() if p.is_dir()):
        model = PeftModel.from_pretrained(load_base(base_dir), adir).eval()
        manifest["adapters"][adir.name] = saved_adapter_entry(adir)
        for j, p in enumerate(prompts):
            logits = arrays[f"logits_{adir.name}_{j}"] = full_logits(model, p)
            effect = np.abs(logits - base_logits[j]).max()
            warn_unless(effect > 1e-2, f"trained/{adir.name}: adapter barely changes the logits")
            print(f"  {adir.name} prompt {j}: max|adapter - base| = {effect:.3f}")
    manifest["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                            "torch": torch.__version__}
    np.savez_compressed(tdir / "expected.npz", **arrays)
    (tdir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/reference"),
                        help="folder to write the variants into (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    parser.add_argument("--variants", nargs="*",
                        choices=sorted([*VARIANTS, "trained", *FAMILIES]),
                        default=[*VARIANTS, "trained", *FAMILIES],
                        help="variants to (re)build (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded CPU kernels: bit-identical reruns
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    for name in VARIANTS:
        if name in args.variants:
            build_variant(name, VARIANTS[name], args.out, args.seed + SEED_OFFSETS[name])
    if "trained" in args.variants:
        build_trained(args.out, args.seed + SEED_OFFSETS["trained"])
    for name in FAMILIES:
        if name in args.variants:
            build_family(name, args.out, args.seed + FAMILY_SEEDS[name])
    print(f"versions: transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
