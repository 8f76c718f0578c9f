"""`lora-jax inspect-adapter PATH [--model DIR]`: load a PEFT adapter and describe it; with
--model, also check it against that base model's layer count and projection shapes."""

import argparse

from lora_jax.cli.options import check_model_folder, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="local adapter folder or Hugging Face Hub id")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="base model folder: check the adapter's layers and shapes against it")
    parser.add_argument("--max-lora-rank", type=positive_int, default=None,
                        help="also check the adapter's rank is at most this")


def _layers(layers: tuple[int, ...], total: int) -> str:
    if len(layers) == total:
        return "all layers"
    return "layers " + ",".join(map(str, layers)) if layers else "no layers"


def run(args: argparse.Namespace) -> int:
    base = None
    if args.model is not None:
        folder = check_model_folder(args.model)
        from models.config import LlamaConfig

        base = LlamaConfig.from_pretrained(folder)
    from lora_jax.lora.adapters import load_adapter

    adapter = load_adapter(args.path, base=base, max_lora_rank=args.max_lora_rank)
    print(f"{adapter.name}: rank {adapter.rank}, {adapter.num_layers} layers, "
          f"modules {sorted(adapter.modules)}")
    for proj, weights in sorted(adapter.modules.items()):
        covered = adapter.layers.get(proj, tuple(range(adapter.num_layers)))
        print(f"  {proj}: rank {weights.rank}, {_layers(covered, adapter.num_layers)}")
    if base is not None:
        print(f"fits {args.model}: {base.num_hidden_layers} layers, every projection's shape "
              "matches")
    return 0
