"""`lora-jax train` and scripts/train_lora.py: train adapters on a base model folder, save PEFT.

    lora-jax train --model BASE_FOLDER --data sql=sql.jsonl --data chat=chat.txt --out adapters/

Each --data NAME=FILE is one adapter (its own slot, data and seed); all of them share the
options below and train together, in one batch. Every adapter lands in OUT/NAME.
"""

import argparse
import math
from pathlib import Path

from lora_jax.lora.adapters import PROJECTIONS


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
    group.add_argument("--rank", type=int, default=8)
    group.add_argument("--alpha", type=float, default=16.0)
    group.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    group.add_argument("--targets", default="q_proj,v_proj",
                       help=f"comma-separated, of {','.join(PROJECTIONS)}, or 'all'")
    group.add_argument("--dropout", type=float, default=0.0, help="PEFT's lora_dropout")
    group = parser.add_argument_group("optimization")
    group.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    group.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--max-grad-norm", type=float, default=1.0)
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the largest dataset (default: 1)")
    group.add_argument("--batch-size", type=int, default=8, help="rows per adapter per step")
    group.add_argument("--grad-accum", type=int, default=1)
    group.add_argument("--seq-len", type=int, default=256)
    group.add_argument("--eval-fraction", type=float, default=0.1,
                       help="held out of each dataset for the eval loss")
    group.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps")
    group.add_argument("--seed", type=int, default=0)


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


def run(args: argparse.Namespace) -> list[Path]:
    """Train and save; returns the adapter folders."""
    from lora_jax.tokenizer import TextTokenizer
    from lora_jax.training.datasets import read_records, split, tokenize
    from lora_jax.training.trainer import AdapterSpec, LoRATrainer, TrainConfig
    from models import load_llama

    files = _named_files(args.data)
    targets = PROJECTIONS if args.targets == "all" else tuple(args.targets.split(","))
    model = load_llama(args.model, dtype=args.dtype)
    tokenizer = TextTokenizer(args.tokenizer or args.model, model.config.bos_token_id)
    train_sets, eval_sets, specs = [], [], []
    for i, (name, file) in enumerate(files.items()):
        examples = tokenize(read_records(file), tokenizer, model.config.eos_token_id)
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


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """run(), with a bad option or input reported the argparse way (usage, message, exit 2)."""
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_lora", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv), parser)
