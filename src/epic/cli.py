"""The `epic` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from epic.models.tiny import PRESETS


def _demo(args: argparse.Namespace) -> int:
    from epic.demo import demo_config, run_demo, run_kd_demo

    from_base = args.from_base or args.kd  # the LLaVA-KD teacher is the converged base
    config = demo_config(quick=args.quick, seed=args.seed, from_base=from_base, workers=args.workers)
    (run_kd_demo if args.kd else run_demo)(config, Path(args.out))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from epic.data.check import check_file

    processor = template = None
    if args.model:
        from transformers import AutoProcessor

        from epic.data.templates import get_template
        from epic.models.factory import saved_template

        processor = AutoProcessor.from_pretrained(args.model)
        template = get_template(args.template or saved_template(args.model), processor.tokenizer)
    report = check_file(Path(args.file), args.images and Path(args.images), processor, template, args.max_length)
    for problem in report.problems:
        print(problem)
    if processor is None:
        print("(no --model given: row lengths were not checked)")
    print(report.summary())
    return 1 if report.problems else 0


def _data_synth(args: argparse.Namespace) -> int:
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


def _require_llava(path: str) -> None:
    """Fail with a clear message when a model folder is not a LLaVA checkpoint."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type != "llava":
        raise SystemExit(f"{path} holds a {model_type!r} model, not a LLaVA model (model_type 'llava')")


def _eval(args: argparse.Namespace) -> int:
    import json

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic.data.templates import get_template
    from epic.eval.runner import CompressionSettings, generate_answers
    from epic.eval.tasks import LOADERS, TASKS
    from epic.models.factory import saved_template

    torch.set_num_threads(args.threads)
    _require_llava(args.model)
    model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    template = get_template(args.template or saved_template(Path(args.model)), processor.tokenizer)
    items = LOADERS[args.task](Path(args.data), args.images and Path(args.images))
    out = Path(args.out)
    if args.grid_methods:
        from epic.eval.grid import grid_table, plot_grid, run_grid

        if not args.tokens:
            raise SystemExit("epic eval: a grid (--methods) needs --tokens, e.g. --tokens 576,192,128,64,36")
        budgets = [int(tokens) for tokens in args.tokens.split(",")]
        rows = run_grid(
            model,
            processor,
            template,
            items,
            out,
            args.grid_methods.split(","),
            budgets,
            args.task,
            args.layer,
            args.batch_size,
            args.max_new_tokens,
        )
        table = grid_table(rows)
        (out / "grid.md").write_text(table + "\n")
        (out / "grid.json").write_text(json.dumps([row.__dict__ for row in rows], indent=1))
        plot_grid(rows, out / "grid.png")
        print(table)
        print(f"table: {out / 'grid.md'}, plot: {out / 'grid.png'}")
        return 0
    compression = None
    if args.method:
        tokens = None if args.tokens is None else int(args.tokens)
        compression = CompressionSettings(args.method, tokens=tokens, ratio=args.ratio, layer=args.layer)
    predictions = generate_answers(
        model,
        processor,
        template,
        items,
        out / "predictions.jsonl",
        compression,
        args.batch_size,
        args.max_new_tokens,
    )
    metrics = TASKS[args.task](items, predictions)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"{'metric':<12} {'value':>8}")
    for name, value in metrics.items():
        if isinstance(value, float):
            print(f"{name:<12} {value:>8.2f}")
    if "pope" in metrics:
        print(f"{'POPE F1':<12} {metrics['pope']['mean_f1']:>8.2f}  (mean over splits)")
    print(f"predictions: {out / 'predictions.jsonl'}, metrics: {out / 'metrics.json'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic.data.shapes import SynthConfig, vocabulary_texts
    from epic.data.templates import get_template
    from epic.eval.show import draw_kept, kept_patches
    from epic.models.factory import build_tiny_llava_with_processor, saved_template
    from epic.models.tiny import TinyLlavaSpec

    torch.set_num_threads(args.threads)
    if args.model:
        _require_llava(args.model)
        model = LlavaForConditionalGeneration.from_pretrained(args.model).eval()
        processor = AutoProcessor.from_pretrained(args.model)
        template = get_template(args.template or saved_template(Path(args.model)), processor.tokenizer)
    else:  # a tiny random model: shows the mechanics, not what a trained model would keep
        spec = TinyLlavaSpec(image_size=84, patch_size=6)
        model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), spec)
        template = get_template("vicuna_v1")
    methods = args.methods.split(",")
    image, results = kept_patches(
        model, processor, template, Path(args.image), args.question, methods, args.tokens, args.layer
    )
    draw_kept(image, results).save(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{r.method} kept {len(r.patches)}" for r in results))
    return 0


def _chat_model(args: argparse.Namespace):
    """Model, processor and template for `epic chat` / `epic web`: MODEL, or the one `epic demo` trained."""
    from epic.chat import ChatError, default_demo_model, load_chat_model

    try:
        folder = Path(args.model) if args.model else default_demo_model()
        _require_llava(str(folder))
        return load_chat_model(folder, args.template)
    except ChatError as error:
        raise SystemExit(f"epic {args.command}: {error}") from None


def _chat(args: argparse.Namespace) -> int:
    import torch

    from epic.chat import ChatError, ChatSession, chat_loop

    torch.set_num_threads(args.threads)
    model, processor, template = _chat_model(args)
    try:
        session = ChatSession(
            model, processor, template, Path(args.image), args.method, args.tokens, args.layer, args.max_new_tokens
        )
    except ChatError as error:
        raise SystemExit(f"epic chat: {error}") from None
    with session:
        return chat_loop(session)


def _web(args: argparse.Namespace) -> int:
    import torch

    from epic.web import WebDemo, check_host, serve

    try:
        check_host(args.host, args.allow_remote)  # before the model loads
    except ValueError as error:
        raise SystemExit(f"epic web: {error}") from None
    torch.set_num_threads(args.threads)
    model, processor, template = _chat_model(args)
    demo = WebDemo(model, processor, template, args.layer, args.max_new_tokens, int(args.max_upload_mb * 2**20))
    serve(demo, args.host, args.port, args.allow_remote)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    import torch
    from transformers import LlavaForConditionalGeneration

    from epic.eval.bench import format_bench, plot_bench, run_bench, synthetic_prompt
    from epic.models.tiny import build_tiny_llava

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model:
        _require_llava(args.model)
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
    else:
        model = build_tiny_llava(PRESETS[args.preset], attn_implementation=args.attn, dtype=dtype)
    model = model.to(args.device).eval()
    inputs = synthetic_prompt(model, args.text_tokens, args.batch)
    budgets = [int(tokens) for tokens in args.tokens.split(",")]
    rows = run_bench(model, inputs, args.methods.split(","), budgets, args.layer, args.repeats, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps([asdict(row) for row in rows], indent=1))
    plot_bench(rows, out / "bench.png")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# {args.model or args.preset}, {args.dtype}, {args.attn}, {device}, batch {args.batch}, K={args.layer}")
    print(format_bench(rows))
    print(f"table: {out / 'bench.json'}, plot: {out / 'bench.png'}")
    return 0


def _train(arguments: list[str]) -> int:
    """`epic train [RECIPE.yaml] [--key value ...]`: the options are forwarded untouched to the recipe parser."""
    from epic.train.config import parse_recipe
    from epic.train.run import disconnect_processes, run_training

    if "--options" in arguments:
        print(_train_help())
        return 0
    recipe = arguments[0] if arguments and not arguments[0].startswith("-") else None
    overrides = arguments[1:] if recipe else arguments
    final = run_training(*parse_recipe(recipe and Path(recipe), overrides))
    disconnect_processes()
    print(f"final checkpoint: {final}")
    return 0


def _train_help() -> str:
    from transformers import HfArgumentParser

    from epic.train.config import ARGUMENT_CLASSES

    return HfArgumentParser(ARGUMENT_CLASSES[:3]).format_help()


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the options `epic chat` and `epic web` share."""
    parser.add_argument(
        "model",
        nargs="?",
        help="a LLaVA folder (default: what `epic demo` trained, epic-demo/models/tcd, stage1 or base)",
    )
    parser.add_argument("--template", help="chat template (default: the one stored with the model, or its own)")
    parser.add_argument("--layer", type=int, default=2, help="K, the first decoder layer that sees the kept tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic", description="Visual-token compression for LLaVA-family models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="the EPIC experiment in miniature: train, compress, distil, evaluate and cost a tiny LLaVA",
        description="Draw the built-in shapes set; stage 1: a tiny LLaVA learns to see and to speak at full tokens "
        "(captions and shape questions); stage 2, from it, every arm learns the scored colour question: SFT at full "
        "tokens, direct training at the N/9 budget, TCD, TCD without distillation and LCD; evaluate every model "
        "with every method at every budget, measure the cost, and write report.md with the tables, plots and "
        "settings. Finished stages are reused from --out.",
    )
    demo.add_argument("--out", default="epic-demo", help="output folder (the stage-1 model is cached there)")
    demo.add_argument("--quick", action="store_true", help="the same pipeline, small everywhere (a few minutes)")
    demo.add_argument("--seed", type=int, default=0, help="data, stage-1 model and first stage-2 seed")
    demo.add_argument(
        "--from-base",
        action="store_true",
        help="the earlier experiment instead: a base trained on the scored question itself, then 300-step "
        "fine-tunes of it (the base is cached in OUT/models/base)",
    )
    demo.add_argument("--workers", type=int, default=2, help="processes, one thread each (default: two cores)")
    demo.add_argument(
        "--kd",
        action="store_true",
        help="LLaVA-KD's ablation instead: a small student with and without distillation from the --from-base model "
        "(PT-SFT against DPT-SFT-DFT), reported in OUT/kd/kd-report.md",
    )
    demo.set_defaults(run=_demo)

    data = commands.add_parser("data", help="check LLaVA-format data; draw the built-in synthetic set")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser(
        "check",
        help="validate a LLaVA-format file and report every problem",
        description="Report every problem of a LLaVA-format JSON/JSONL file with its line or id, then a summary. "
        "Exits 1 when any row has a problem.",
    )
    check.add_argument("file")
    check.add_argument("--images", help="the folder image paths are relative to")
    check.add_argument("--model", help="a LLaVA folder (processor + epic.json) to also check row lengths")
    check.add_argument("--template", help="conversation template (default: the one stored with --model)")
    check.add_argument("--max-length", type=int, default=2048)
    check.set_defaults(run=_data_check)

    synth = data_commands.add_parser(
        "synth",
        help="draw the built-in synthetic visual QA set (shapes)",
        description="Write train/val/test LLaVA-format JSON, a caption set and PNG images. Deterministic by seed.",
    )
    synth.add_argument("out_dir")
    synth.add_argument("--n-train", type=int, default=6000, help="training questions")
    synth.add_argument("--n-val", type=int, default=500)
    synth.add_argument("--n-test", type=int, default=1500)
    synth.add_argument("--n-captions", type=int, default=2000, help="captions for projector pre-training")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--grid", type=int, default=3)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_data_synth)

    evaluate = commands.add_parser(
        "eval",
        help="batched greedy evaluation, optionally compressed; predictions JSONL, metrics JSON, a table",
        description="Generate answers for an evaluation file (resuming from OUT/predictions.jsonl) and score them.",
    )
    evaluate.add_argument("model", help="a LLaVA folder (with its processor and epic.json)")
    evaluate.add_argument("--data", required=True, help="LLaVA-format file; the last reply of each row is the answer")
    evaluate.add_argument("--images", help="the folder image paths are relative to")
    evaluate.add_argument(
        "--task", choices=["shapes", "pope", "gqa", "vqa", "mme", "mc", "mmbench", "sqa"], default="shapes"
    )
    evaluate.add_argument("--template", help="default: the one stored with the model")
    evaluate.add_argument("--method", help="compress with this method (default: no compression)")
    evaluate.add_argument("--tokens", help="kept visual tokens per image; with --methods a comma-separated list")
    evaluate.add_argument("--ratio", type=float)
    evaluate.add_argument("--layer", type=int, default=2)
    evaluate.add_argument(
        "--methods",
        dest="grid_methods",
        help="a grid: these methods (comma-separated) at every --tokens budget "
        "(the image's full count means no compression)",
    )
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=8)
    evaluate.add_argument("--out", default="epic-out/eval")
    evaluate.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    evaluate.set_defaults(run=_eval)

    show = commands.add_parser(
        "show",
        help="draw the patches each method keeps on one image",
        description="Write one PNG: the image as the model sees it and, per method, the kept patches outlined and "
        "the dropped ones dimmed. Without --model a tiny random model is used (the mechanics, not a trained choice).",
    )
    show.add_argument("image")
    show.add_argument("--model", help="a LLaVA folder (with its processor and epic.json)")
    show.add_argument("--template")
    show.add_argument("--methods", default="dart,fastv,random")
    show.add_argument("--tokens", type=int, default=64)
    show.add_argument("--layer", type=int, default=2)
    show.add_argument("--question", default="What is in the image?")
    show.add_argument("--out", default="kept.png")
    show.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    show.set_defaults(run=_show)

    bench = commands.add_parser(
        "bench",
        help="prefill and decoding cost per method and budget, KV cache and FLOPs, against no compression",
        description="Measure compression's cost and savings on a checkpoint or on a model built from a preset "
        "with random weights (e.g. llava-7b shapes, no download); a table, bench.json and bench.png.",
    )
    bench.add_argument("model", nargs="?", help="a LLaVA checkpoint (default: --preset)")
    bench.add_argument("--preset", choices=["tiny", "cpu-wide", "llava-7b"], default="tiny")
    bench.add_argument("--methods", default="dart,fastv,random")
    bench.add_argument("--tokens", default="32,16,7", help="kept visual tokens per image, comma-separated")
    bench.add_argument("--layer", type=int, default=2)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--text-tokens", type=int, default=40)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--new-tokens", type=int, default=8)
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out", default="epic-out/bench")
    bench.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    bench.set_defaults(run=_bench)

    chat = commands.add_parser(
        "chat",
        help="talk about an image with a compressed model in the terminal (multi-turn, streamed, with costs)",
        description="A multi-turn conversation about one image; the image is compressed once at the first turn and "
        "later turns reuse the KV cache. Commands between turns: /tokens N, /method NAME, /image PATH, /reset, "
        "/quit. Each answer ends with a cost line.",
    )
    _model_arguments(chat)
    chat.add_argument("--image", required=True, help="the image to talk about")
    chat.add_argument("--method", default="dart", help="dart, fastv, random, or none (all visual tokens)")
    chat.add_argument("--tokens", type=int, default=64, help="visual tokens kept per image")
    chat.set_defaults(run=_chat)

    web = commands.add_parser(
        "web",
        help="a local web page to ask a compressed model about an image (Gradio: pip install 'epic-mllm[web]')",
        description="Image upload, question, method and budget, the answer (optionally beside the full-token one), "
        "the kept-token overlay and the costs. Listens on 127.0.0.1; another address needs --host and "
        "--allow-remote.",
    )
    _model_arguments(web)
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless --allow-remote)")
    web.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback: anyone who can reach it can use the model",
    )
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image upload accepted")
    web.set_defaults(run=_web)

    train = commands.add_parser(
        "train",
        help="train: sft, tcd, lcd, tcd+lcd or LLaVA-KD (kd-pretrain, kd-finetune, kd-tcd) from a YAML recipe",
        description="Train from a YAML recipe; `--key value` pairs after it override the recipe. Modes (--mode): "
        "sft, tcd, lcd, tcd+lcd (EPIC), and kd-pretrain, kd-finetune, kd-tcd (LLaVA-KD, from a --teacher). Options: "
        "epic's own (below, run `epic train --options` for the full list with defaults) and every transformers "
        "TrainingArguments field (output_dir, learning_rate, max_steps, save_steps, bf16, deepspeed, ...).",
    )
    train.add_argument("recipe", nargs="?", help="a YAML recipe")
    train.add_argument("--options", action="store_true", help="list epic's training options and their defaults")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
