"""The `epic` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import os
import sys

from epic.models.tiny import TEXT_CONFIGS, TinyLlavaSpec

DEMO_SPEC = TinyLlavaSpec(
    vocab_size=512,
    hidden_size=512,
    intermediate_size=1408,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    image_size=84,
    patch_size=6,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from epic.tour import format_tour, run_tour

    torch.set_num_threads(args.threads)
    spec = TinyLlavaSpec(**{**DEMO_SPEC.__dict__, "text_model": args.text_model})
    tour = run_tour(spec, layer=args.layer, batch=args.batch, repeats=args.repeats, seed=args.seed)
    print(format_tour(tour))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic", description="Visual-token compression for LLaVA-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="compress a tiny LLaVA with every method; print what was kept and what it saved",
        description="Build a tiny LLaVA (random weights, offline), compress it with every registered method at "
        "the paper's budgets scaled to its image, and print the kept patches, prefill time and KV cache.",
    )
    demo.add_argument("--text-model", choices=sorted(TEXT_CONFIGS), default="llama")
    demo.add_argument("--layer", type=int, default=2, help="K, the first decoder layer that sees the kept tokens")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=3, help="timed prefills per measurement (median)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
