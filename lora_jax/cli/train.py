"""`lora-jax train` and scripts/train_lora.py: train adapters on a base model folder, save PEFT.

    lora-jax train --model BASE_FOLDER --data sql=sql.jsonl --data chat=chat.txt --out adapters/

Each --data NAME=FILE is one adapter (its own slot, data and seed); all of them share the
options below and train together, in one batch. Every adapter lands in OUT/NAME.
"""

import argparse
import math
from pathlib import Path

from lora_jax.cli.errors import CommandError
from lora_jax.cli.options import (
    check_model_folder,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

TARGETS_HELP = ("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Phi-3 also its "
                "fused qkv_proj, gate_up_proj: one A per module, as PEFT trains them)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model folder (Hugging Face Llama)")
    parser.add_argument("--data", required=True, action="append", metavar="NAME=FILE",
                        help="an adapter's dataset: .jsonl with prompt/completion (or text) "
                             "per line, or a text file, one example per line; repeat for more")
    parser.add_argument("--out", required=True, help="folder for the adapters' PEFT folders")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or its folder (default: the model folder)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="base model compute dtype; adapter weights train in float32")
    group = parser.add_argument_group("adapter")
    group.add_argument("--rank", type=positive_int, default=8,
                       help="LoRA rank r of every adapter (A is r x in, B is out x r)")
    group.add_argument("--alpha", type=positive_float, default=16.0,
                       help="LoRA alpha: the update is scaled by alpha / rank")
    group.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    group.add_argument("--targets", default="q_proj,v_proj",
                       help=f"modules to adapt, comma-separated, of: {TARGETS_HELP}; or 'all'")
    group.add_argument("--dropout", type=fraction, default=0.0, help="PEFT's lora_dropout")
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=positive_float, default=2e-4,
                       help="peak AdamW learning rate")
    group.add_argument("--warmup", type=nonnegative_int, default=0, help="linear warm-up steps")
    group.add_argument("--weight-decay", type=nonnegative_float, default=0.0,
                       help="AdamW weight decay of the adapter weights")
    group.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0,
                       help="clip the gradient norm to this (0 = no clipping)")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=positive_float, default=None,
                        help="passes over the largest dataset (default: 1)")
    group.add_argument("--batch-size", type=positive_int, default=8,
                       help="rows per adapter per step")
    group.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches summed into each optimizer step")
    group.add_argument("--seq-len", type=positive_int, default=256,
                       help="tokens per row; longer examples are cut to it")
    group.add_argument("--eval-fraction", type=fraction, default=0.1,
                       help="held out of each dataset for the eval loss")
    group.add_argument("--eval-every", type=nonnegative_int, default=0,
                       help="also evaluate every N steps")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the adapters' initial weights, shuffling and dropout")


def _named_files(values: list[str]) -> dict[str, Path]:
    files = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--data takes NAME=FILE, got {value!r}")
        if name in files:
            raise ValueError(f"--data names adapter {name!r} twice")
        files[name] = Path(file)
    return files


def _targets(value: str) -> tuple[str, ...]:
    from models.config import FUSED, PROJECTIONS

    if value == "all":
        return PROJECTIONS
    targets = tuple(t.strip() for t in value.split(","))
    unknown = [t for t in targets if t not in PROJECTIONS and t not in FUSED]
    if unknown or not targets:
        raise ValueError(f"--targets: {unknown} are not projections; use a comma-separated "
                         f"subset of {','.join(PROJECTIONS)} (Phi-3: {','.join(FUSED)}, "
                         "o_proj, down_proj), or 'all'")
    return targets


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--data and --targets written wrong: usage errors (exit 2), before anything loads."""
    try:
        _named_files(args.data)
        _targets(args.targets)
    except ValueError as err:
        parser.error(str(err))


def _read_datasets(files: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    """Every dataset read and checked before the model loads; errors name the file."""
    from lora_jax.training.datasets import read_records

    datasets = {}
    for name, file in files.items():
        records = read_records(file)
        if not records:
            raise CommandError(f"dataset {str(file)!r} (--data {name}=...) has no examples")
        for number, record in enumerate(records, 1):
            bad = [k for k in ("prompt", "completion", "text")
                   if k in record and not isinstance(record[k], str)]
            if bad:
                raise CommandError(f"dataset {str(file)!r} example {number}: {bad[0]!r} must "
                                   f"be a string, got {record[bad[0]]!r:.40}")
        datasets[name] = records
    return datasets


def train(args: argparse.Namespace) -> list[Path]:
    """Train and save; returns the adapter folders."""
    files, targets = _named_files(args.data), _targets(args.targets)
    datasets = _read_datasets(files)
    check_model_folder(args.model)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out!r} is a file; pass a folder for the adapters")
    from lora_jax.tokenizer import TextTokenizer
    from lora_jax.training.datasets import split, tokenize
    from lora_jax.training.trainer import AdapterSpec, LoRATrainer, TrainConfig
    from models import LlamaConfig, load_llama

    tokenizer = TextTokenizer(args.tokenizer or args.model,
                              LlamaConfig.from_pretrained(args.model).bos_token_id)
    model = load_llama(args.model, dtype=args.dtype)
    if args.targets == "all":  # every linear module as the family names it (Phi-3's fused)
        targets = model.config.peft_modules
    train_sets, eval_sets, specs = [], [], []
    for i, (name, file) in enumerate(files.items()):
        examples = tokenize(datasets[name], tokenizer, model.config.eos_token_id)
        train, held_out = split(examples, args.eval_fraction, args.seed + i)
        train_sets.append(train)
        eval_sets.append(held_out)
        specs.append(AdapterSpec(name, rank=args.rank, alpha=args.alpha, use_rslora=args.rslora,
                                 target_modules=targets, seed=args.seed + i))
        print(f"{name}: {len(train)} training, {len(held_out)} held-out examples from {file}")
    # Epochs count passes over the largest dataset; smaller ones go round more often.
    per_step = args.batch_size * args.grad_accum
    steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * max(map(len, train_sets))
                                           / per_step))
    config = TrainConfig(
        steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        dropout=args.dropout, seed=args.seed, eval_every=args.eval_every)
    trainer = LoRATrainer(model, specs, config)
    history = trainer.train(train_sets, eval_sets if any(eval_sets) else None)
    final = history[-1]
    for name in files:
        eval_loss = final.get("eval_loss", {}).get(name, math.nan)
        print(f"{name}: train loss {final['loss'][name]:.4f}, eval loss {eval_loss:.4f}")
    folders = trainer.save(args.out, base_model_name_or_path=args.model)
    for folder in folders:
        print(f"saved {folder}")
    return folders


def main(argv: list[str] | None = None) -> int:
    """scripts/train_lora.py: the same options, errors reported like `lora-jax train`."""
    from lora_jax.cli.errors import debug_requested, run_reporting

    parser = argparse.ArgumentParser(prog="train_lora", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    check(args, parser)
    return run_reporting("train_lora", lambda: run(args), debug_requested(args.debug))


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0
