"""`epic demo`, `data`, `chat`, `web` and `train`: the commands that run the library's bigger parts."""

from __future__ import annotations

import argparse
from pathlib import Path

from epic.cli.common import HelpFormatter, existing
from epic.models.loading import TOKENIZER_TEMPLATE, LoadedLlava, load_llava

DEMO_MODELS = ("tcd", "stage1", "base")  # what `epic demo` saves under <root>/models/, in order of preference


def demo(args: argparse.Namespace) -> int:
    from epic.demo import demo_config, run_demo, run_kd_demo

    from_base = args.from_base or args.kd  # the LLaVA-KD teacher is the converged base
    config = demo_config(quick=args.quick, seed=args.seed, from_base=from_base, workers=args.workers)
    (run_kd_demo if args.kd else run_demo)(config, Path(args.out))
    return 0


def data_check(args: argparse.Namespace) -> int:
    from epic.data.check import check_file

    processor = template = None
    if args.model:
        _, processor, template = load_llava(args.model, args.template)
    data = existing(args.file, "FILE")
    print(f"epic data check: {data}" + (f", row lengths with {args.model}'s processor" if args.model else ""))
    report = check_file(data, args.images and Path(args.images), processor, template, args.max_length)
    for problem in report.problems:
        print(problem)
    if processor is None:
        print("(no --model given: row lengths were not checked)")
    print(report.summary())
    return 1 if report.problems else 0


def data_synth(args: argparse.Namespace) -> int:
    import time

    from epic.data.shapes import SynthConfig, write_synthetic

    config = SynthConfig(
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        n_captions=args.n_captions,
        image_size=args.image_size,
        grid=args.grid,
        seed=args.seed,
    )
    start = time.perf_counter()
    files = write_synthetic(Path(args.out_dir), config)
    print(f"wrote the shapes set to {args.out_dir} in {time.perf_counter() - start:.1f} s:")
    for name, path in files.items():
        print(f"  {name}: {path}")
    return 0


def default_demo_model(root: Path = Path("epic-demo")) -> Path:
    """The model `epic demo` trained under `root`: `models/tcd`, else its stage-1 or base model; else an error."""
    for name in DEMO_MODELS:
        folder = Path(root) / "models" / name
        if (folder / "config.json").is_file():
            return folder
    looked = ", ".join(str(Path(root) / "models" / name) for name in DEMO_MODELS)
    raise ValueError(
        f"no model given and none trained by `epic demo` (looked for {looked}): run `epic demo` first, "
        "or pass a LLaVA model folder"
    )


def chat_model(args: argparse.Namespace) -> LoadedLlava:
    """Model, processor and template for `epic chat` / `epic web`: MODEL, or the one `epic demo` trained; the
    template stored with it, else the tokenizer's own."""
    folder = Path(args.model) if args.model else default_demo_model()
    print(f"epic {args.command}: {folder}")
    return load_llava(folder, args.template, fallback_template=TOKENIZER_TEMPLATE)


def chat(args: argparse.Namespace) -> int:
    import torch

    from epic.chat import ChatSession
    from epic.chat.terminal import chat_loop
    from epic.compression import default_tokens
    from epic.data.dataset import image_token_count

    torch.set_num_threads(args.threads)
    model, processor, template = chat_model(args)
    tokens = default_tokens(image_token_count(processor)) if args.tokens is None else args.tokens
    session = ChatSession(
        model, processor, template, Path(args.image), args.method, tokens, args.layer, args.max_new_tokens
    )
    with session:
        return chat_loop(session)


def web(args: argparse.Namespace) -> int:
    import torch

    from epic.web import WebDemo, check_host, serve

    check_host(args.host, args.allow_remote)  # before the model loads
    torch.set_num_threads(args.threads)
    model, processor, template = chat_model(args)
    demo = WebDemo(model, processor, template, args.layer, args.max_new_tokens, int(args.max_upload_mb * 2**20))
    demo.warm_up()
    serve(demo, args.host, args.port, args.allow_remote)
    return 0


def train(arguments: list[str]) -> int:
    """`epic train [RECIPE.yaml] [--key value ...]`: the options are forwarded untouched to the recipe parser."""
    from epic.train.config import parse_recipe
    from epic.train.run import disconnect_processes, run_training

    if "--options" in arguments:
        print(train_options())
        return 0
    recipe = arguments[0] if arguments and not arguments[0].startswith("-") else None
    overrides = arguments[1:] if recipe else arguments
    final = run_training(*parse_recipe(recipe and Path(recipe), overrides))
    disconnect_processes()
    print(f"final checkpoint: {final}")
    return 0


def train_options() -> str:
    """`epic train --options`: epic's training options by section, each default once."""
    from epic.train.config import ARGUMENT_CLASSES, OptionParser

    parser = OptionParser(
        ARGUMENT_CLASSES[:3],
        prog="epic train",
        usage="epic train [RECIPE.yaml] [--key value ...]",
        description="epic's training options (recipe keys, or --key value after the recipe). Every transformers "
        "TrainingArguments field (output_dir, learning_rate, max_steps, save_steps, bf16, deepspeed, ...) is an "
        "option too.",
        formatter_class=HelpFormatter,
    )
    return parser.format_help()
