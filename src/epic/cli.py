"""The `epic` command line: thin wrappers over the library.

Every command prints a one-line header of what it runs. A mistake in what it was given (a missing file, an unknown
method, a budget larger than the image, a folder that is not a LLaVA model, ...) ends it with one line,
`epic COMMAND: message`, and exit status 2; `epic --debug COMMAND ...` (or `EPIC_DEBUG=1`) shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from epic import __version__
from epic.models.tiny import PRESETS

USAGE_ERROR = 2  # the exit status of a command refused for what it was given
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # `owner/name`: left to transformers (its cache, or the Hub when online)
LAYER_HELP = "K, the first decoder layer that sees only the kept tokens"
THREADS_HELP = "torch threads (default: $OMP_NUM_THREADS, else 1)"


def _default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


def _demo(args: argparse.Namespace) -> int:
    from epic.demo import demo_config, run_demo, run_kd_demo

    from_base = args.from_base or args.kd  # the LLaVA-KD teacher is the converged base
    config = demo_config(quick=args.quick, seed=args.seed, from_base=from_base, workers=args.workers)
    (run_kd_demo if args.kd else run_demo)(config, Path(args.out))
    return 0


def _llava_folder(path: str) -> str:
    """`path` when it holds a LLaVA model (`config.json` with model_type 'llava'); else a one-line error."""
    folder = Path(path)
    if not folder.exists() and HUB_ID.fullmatch(path) and not path.startswith("."):
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
    elif not folder.is_dir():
        raise ValueError(
            f"{path}: no such model folder (give a folder saved by `epic train`, `epic demo` or save_pretrained)"
        )
    elif not (folder / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json (give the folder save_pretrained wrote)")
    else:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ValueError(f"{path} holds a {model_type!r} model, not a LLaVA model (model_type 'llava')")
    return path


def _load_llava(path: str, template: str | None):
    """(model in eval mode, processor, template) of a LLaVA folder; the template stored with it unless named."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from epic.data.templates import get_template
    from epic.models.factory import saved_template

    model = LlavaForConditionalGeneration.from_pretrained(_llava_folder(path)).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, get_template(template or saved_template(Path(path)), processor.tokenizer)


def _existing(path: str, option: str) -> Path:
    """`path` when it exists (a file, or a benchmark's folder); else a one-line error naming the option."""
    if not Path(path).exists():
        raise ValueError(f"{option} {path}: no such file")
    return Path(path)


def _data_check(args: argparse.Namespace) -> int:
    from epic.data.check import check_file

    processor = template = None
    if args.model:
        _, processor, template = _load_llava(args.model, args.template)
    data = _existing(args.file, "FILE")
    print(f"epic data check: {data}" + (f", row lengths with {args.model}'s processor" if args.model else ""))
    report = check_file(data, args.images and Path(args.images), processor, template, args.max_length)
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


def _budget_list(text: str) -> list[int]:
    """`--tokens 64,16,7` as integers; a one-line error for anything else."""
    try:
        return [int(tokens) for tokens in text.split(",")]
    except ValueError:
        raise ValueError(f"--tokens takes whole numbers separated by commas (e.g. 64,16,7), got {text!r}") from None


def _compression(method: str, tokens: int | None, ratio: float | None, layer: int, image_tokens: int):
    """The compression a command runs and its words for the header; `method` 'none' keeps every token, and without
    --tokens or --ratio a method keeps N/9 of the image's tokens."""
    from epic.compression import METHODS, Budget, default_tokens
    from epic.eval.runner import CompressionSettings

    if method == "none":
        if tokens is not None or ratio is not None:
            raise ValueError("--method none keeps every visual token: drop --tokens/--ratio, or choose a method")
        return None, f"no compression, all {image_tokens} visual tokens"
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}: choose one of {', '.join(sorted(METHODS))} or none")
    if tokens is None and ratio is None:
        tokens = default_tokens(image_tokens)
    kept = Budget(tokens, ratio).resolve(image_tokens)
    words = f"{method}, {kept} of {image_tokens} visual tokens per image kept from layer {layer}"
    return CompressionSettings(method, tokens=tokens, ratio=ratio, layer=layer), words


def _eval(args: argparse.Namespace) -> int:
    import torch

    from epic.data.dataset import image_token_count
    from epic.eval.provenance import recorded_settings
    from epic.eval.runner import generate_answers
    from epic.eval.tasks import LOADERS, TASKS

    torch.set_num_threads(args.threads)
    _llava_folder(args.model)
    data = _existing(args.data, "--data")
    model, processor, template = _load_llava(args.model, args.template)
    processor.tokenizer.padding_side = "left"
    items = LOADERS[args.task](data, args.images and Path(args.images))
    image_tokens = image_token_count(processor)
    out = Path(args.out)
    rows = f"{len(items)} {args.task} items of {data}"
    if args.grid_methods:
        return _eval_grid(args, model, processor, template, items, image_tokens, rows)
    tokens = None if args.tokens is None else _budget_list(args.tokens)[0]
    compression, words = _compression(args.method, tokens, args.ratio, args.layer, image_tokens)
    print(f"epic eval: {args.model} | {words} | {rows} | into {out}")
    path = out / "predictions.jsonl"
    predictions = generate_answers(
        model,
        processor,
        template,
        items,
        path,
        compression,
        args.batch_size,
        args.max_new_tokens,
        restart=args.restart,
    )
    metrics = TASKS[args.task](items, predictions)
    (out / "metrics.json").write_text(json.dumps({**metrics, "settings": recorded_settings(path)}, indent=1))
    print(f"{'metric':<12} {'value':>8}")
    for name, value in metrics.items():
        if isinstance(value, float):
            print(f"{name:<12} {value:>8.2f}")
    if "pope" in metrics:
        print(f"{'POPE F1':<12} {metrics['pope']['mean_f1']:>8.2f}  (mean over splits)")
    print(f"predictions: {path}, metrics: {out / 'metrics.json'}")
    return 0


def _eval_grid(args: argparse.Namespace, model, processor, template, items, image_tokens: int, rows: str) -> int:
    """`epic eval --methods A,B --tokens N1,N2,...`: every method at every budget, a table, grid.json and a plot."""
    from epic.compression import METHODS
    from epic.eval.grid import grid_table, plot_grid, run_grid

    if not args.tokens:
        raise ValueError(f"a grid (--methods) needs --tokens, e.g. --tokens {image_tokens},{image_tokens // 9}")
    budgets = _budget_list(args.tokens)
    methods = args.grid_methods.split(",")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown compression method(s) {', '.join(unknown)}: choose from {', '.join(sorted(METHODS))}"
        )
    out = Path(args.out)
    print(
        f"epic eval: {args.model} | {', '.join(methods)} at {args.tokens} of {image_tokens} visual tokens from "
        f"layer {args.layer} | {rows} | into {out}"
    )
    grid = run_grid(
        model,
        processor,
        template,
        items,
        out,
        methods,
        budgets,
        args.task,
        args.layer,
        args.batch_size,
        args.max_new_tokens,
        restart=args.restart,
    )
    table = grid_table(grid)
    (out / "grid.md").write_text(table + "\n")
    (out / "grid.json").write_text(json.dumps([row.__dict__ for row in grid], indent=1))
    plot_grid(grid, out / "grid.png")
    print(table)
    print(f"table: {out / 'grid.md'}, plot: {out / 'grid.png'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import torch

    from epic.compression import default_tokens
    from epic.data.dataset import image_token_count
    from epic.data.shapes import SynthConfig, vocabulary_texts
    from epic.data.templates import get_template
    from epic.eval.show import draw_kept, kept_patches
    from epic.models.factory import build_tiny_llava_with_processor
    from epic.models.tiny import TinyLlavaSpec

    torch.set_num_threads(args.threads)
    image = _existing(args.image, "IMAGE")
    if args.model:
        model, processor, template = _load_llava(args.model, args.template)
    else:  # a tiny random model: shows the mechanics, not what a trained model would keep
        spec = TinyLlavaSpec(image_size=84, patch_size=6)
        model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), spec)
        template = get_template("vicuna_v1")
    image_tokens = image_token_count(processor)
    tokens = default_tokens(image_tokens) if args.tokens is None else args.tokens
    methods = args.methods.split(",")
    name = args.model or "a tiny random model"
    print(f"epic show: {name} | {', '.join(methods)}, {tokens} of {image_tokens} visual tokens from layer {args.layer}")
    image, results = kept_patches(model, processor, template, image, args.question, methods, tokens, args.layer)
    draw_kept(image, results).save(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{r.method} kept {len(r.patches)}" for r in results))
    return 0


def _chat_model(args: argparse.Namespace):
    """Model, processor and template for `epic chat` / `epic web`: MODEL, or the one `epic demo` trained."""
    from epic.chat import default_demo_model, load_chat_model

    folder = Path(args.model) if args.model else default_demo_model()
    print(f"epic {args.command}: {folder}")
    return load_chat_model(Path(_llava_folder(str(folder))), args.template)


def _chat(args: argparse.Namespace) -> int:
    import torch

    from epic.chat import ChatSession, chat_loop
    from epic.compression import default_tokens
    from epic.data.dataset import image_token_count

    torch.set_num_threads(args.threads)
    model, processor, template = _chat_model(args)
    tokens = default_tokens(image_token_count(processor)) if args.tokens is None else args.tokens
    session = ChatSession(
        model, processor, template, Path(args.image), args.method, tokens, args.layer, args.max_new_tokens
    )
    with session:
        return chat_loop(session)


def _web(args: argparse.Namespace) -> int:
    import torch

    from epic.web import WebDemo, check_host, serve

    check_host(args.host, args.allow_remote)  # before the model loads
    torch.set_num_threads(args.threads)
    model, processor, template = _chat_model(args)
    demo = WebDemo(model, processor, template, args.layer, args.max_new_tokens, int(args.max_upload_mb * 2**20))
    demo.warm_up()
    serve(demo, args.host, args.port, args.allow_remote)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch
    from transformers import LlavaForConditionalGeneration

    from epic.eval.bench import format_bench, plot_bench, run_bench, synthetic_prompt
    from epic.models.tiny import build_tiny_llava

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = LlavaForConditionalGeneration.from_pretrained(
            _llava_folder(args.model), dtype=dtype, attn_implementation=args.attn
        )
    else:
        model = build_tiny_llava(PRESETS[args.preset], attn_implementation=args.attn, dtype=dtype)
    model = model.to(args.device).eval()
    inputs = synthetic_prompt(model, args.text_tokens, args.batch)
    budgets = _budget_list(args.tokens)
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
    parser.add_argument("--layer", type=int, default=2, help=LAYER_HELP)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    parser.add_argument("--threads", type=int, default=_default_threads(), help=THREADS_HELP)


def _compression_arguments(parser: argparse.ArgumentParser, tokens_help: str) -> None:
    """--method, --tokens, --ratio and --layer, as `epic eval`, `show` and `chat` read them."""
    parser.add_argument("--tokens", help=tokens_help)
    parser.add_argument(
        "--ratio", type=float, help="instead of --tokens: the share of visual tokens to drop, in [0, 1)"
    )
    parser.add_argument("--layer", type=int, default=2, help=LAYER_HELP)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every option's help, except where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default:" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epic",
        description="Visual-token compression for LLaVA-family models.",
        epilog="`epic --debug COMMAND ...` shows the traceback of an error instead of its one-line message.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"epic {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (give it before the command)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, formatter_class=_Formatter, **kwargs)

    demo = command(
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
    demo.add_argument("--workers", type=int, default=2, help="processes, one thread each (two for two cores)")
    demo.add_argument(
        "--kd",
        action="store_true",
        help="LLaVA-KD's ablation instead: a small student with and without distillation from the --from-base model "
        "(PT-SFT against DPT-SFT-DFT), reported in OUT/kd/kd-report.md",
    )
    demo.set_defaults(run=_demo)

    data = command("data", help="check LLaVA-format data; draw the built-in synthetic set")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser(
        "check",
        help="validate a LLaVA-format file and report every problem",
        description="Report every problem of a LLaVA-format JSON/JSONL file with its line or id, then a summary. "
        "Exits 1 when any row has a problem.",
        formatter_class=_Formatter,
    )
    check.add_argument("file", help="a LLaVA-format JSON (a list of rows) or JSONL file")
    check.add_argument("--images", help="the folder image paths are relative to")
    check.add_argument("--model", help="a LLaVA folder (processor + epic.json) to also check row lengths")
    check.add_argument("--template", help="conversation template (default: the one stored with --model)")
    check.add_argument("--max-length", type=int, default=2048, help="longest row in tokens, images counted")
    check.set_defaults(run=_data_check)

    synth = data_commands.add_parser(
        "synth",
        help="draw the built-in synthetic visual QA set (shapes)",
        description="Write train/val/test LLaVA-format JSON, a caption set and PNG images. Deterministic by seed.",
        formatter_class=_Formatter,
    )
    synth.add_argument("out_dir", help="folder to write into")
    synth.add_argument("--n-train", type=int, default=6000, help="training questions")
    synth.add_argument("--n-val", type=int, default=500, help="validation questions")
    synth.add_argument("--n-test", type=int, default=1500, help="test questions")
    synth.add_argument("--n-captions", type=int, default=2000, help="captions for projector pre-training")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--grid", type=int, default=3, help="cells per side of the grid the shapes sit on")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.set_defaults(run=_data_synth)

    evaluate = command(
        "eval",
        help="batched greedy evaluation, compressed (DART at N/9 by default); predictions, metrics, a table",
        description="Generate answers for an evaluation file and score them. Answers are appended to "
        "OUT/predictions.jsonl with their settings beside it: an interrupted run resumes, and a run with other "
        "settings (model, method, budget, data, ...) into the same --out is refused (or --restart).",
    )
    evaluate.add_argument("model", help="a LLaVA folder (with its processor and epic.json)")
    evaluate.add_argument("--data", required=True, help="LLaVA-format file; the last reply of each row is the answer")
    evaluate.add_argument("--images", help="the folder image paths are relative to")
    evaluate.add_argument(
        "--task",
        choices=["shapes", "pope", "gqa", "vqa", "mme", "mc", "mmbench", "sqa"],
        default="shapes",
        help="how answers are scored (shapes: the built-in set; the others: the benchmarks of the same names)",
    )
    evaluate.add_argument("--template", help="conversation template (default: the one stored with the model)")
    evaluate.add_argument("--method", default="dart", help="compression method, or none for every visual token")
    _compression_arguments(
        evaluate, "kept visual tokens per image (default: N/9 of the image's); with --methods a comma-separated list"
    )
    evaluate.add_argument(
        "--methods",
        dest="grid_methods",
        help="a grid: these methods (comma-separated) at every --tokens budget "
        "(the image's full count means no compression)",
    )
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions per generate call (left-padded)")
    evaluate.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    evaluate.add_argument("--out", default="epic-out/eval", help="folder for predictions, metrics and the grid")
    evaluate.add_argument("--restart", action="store_true", help="discard answers already in --out and start afresh")
    evaluate.add_argument("--threads", type=int, default=_default_threads(), help=THREADS_HELP)
    evaluate.set_defaults(run=_eval)

    show = command(
        "show",
        help="draw the patches each method keeps on one image",
        description="Write one PNG: the image as the model sees it and, per method, the kept patches outlined and "
        "the dropped ones dimmed. Without --model a tiny random model is used (the mechanics, not a trained choice).",
    )
    show.add_argument("image", help="the image file")
    show.add_argument("--model", help="a LLaVA folder (default: a tiny random model)")
    show.add_argument("--template", help="conversation template (default: the one stored with the model)")
    show.add_argument("--methods", default="dart,fastv,random", help="methods to draw, comma-separated")
    show.add_argument("--tokens", type=int, help="kept visual tokens per image (default: N/9 of the image's)")
    show.add_argument("--layer", type=int, default=2, help=LAYER_HELP)
    show.add_argument("--question", default="What is in the image?", help="the question the text-aware methods read")
    show.add_argument("--out", default="kept.png", help="the PNG to write")
    show.add_argument("--threads", type=int, default=_default_threads(), help=THREADS_HELP)
    show.set_defaults(run=_show)

    bench = command(
        "bench",
        help="prefill and decoding cost per method and budget, KV cache and FLOPs, against no compression",
        description="Measure compression's cost and savings on a checkpoint or on a model built from a preset "
        "with random weights (e.g. llava-7b shapes, no download); a table, bench.json and bench.png.",
    )
    bench.add_argument("model", nargs="?", help="a LLaVA checkpoint (default: --preset)")
    bench.add_argument(
        "--preset", choices=["tiny", "cpu-wide", "llava-7b"], default="tiny", help="model shape without MODEL"
    )
    bench.add_argument("--methods", default="dart,fastv,random", help="methods to measure, comma-separated")
    bench.add_argument("--tokens", default="32,16,7", help="kept visual tokens per image, comma-separated")
    bench.add_argument("--layer", type=int, default=2, help=LAYER_HELP)
    bench.add_argument("--batch", type=int, default=1, help="prompts per forward")
    bench.add_argument("--text-tokens", type=int, default=40, help="text tokens of the synthetic prompt")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration")
    bench.add_argument("--new-tokens", type=int, default=8, help="decoding steps timed")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    bench.add_argument("--attn", default="sdpa", help="attention: eager, sdpa or flash_attention_2")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--out", default="epic-out/bench", help="folder for bench.json and bench.png")
    bench.add_argument("--threads", type=int, default=_default_threads(), help=THREADS_HELP)
    bench.set_defaults(run=_bench)

    chat = command(
        "chat",
        help="talk about an image with a compressed model in the terminal (multi-turn, streamed, with costs)",
        description="A multi-turn conversation about one image; the image is compressed once at the first turn and "
        "later turns reuse the KV cache. Commands between turns: /tokens N, /method NAME, /image PATH, /reset, "
        "/quit. Each answer ends with a cost line.",
    )
    _model_arguments(chat)
    chat.add_argument("--image", required=True, help="the image to talk about")
    chat.add_argument("--method", default="dart", help="dart, fastv, random, or none (all visual tokens)")
    chat.add_argument("--tokens", type=int, help="visual tokens kept per image (default: N/9 of the image's)")
    chat.set_defaults(run=_chat)

    web = command(
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
    web.add_argument("--port", type=int, default=7860, help="port to listen on")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image upload accepted")
    web.set_defaults(run=_web)

    train = command(
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


def _one_line(error: BaseException) -> str:
    """An error as the one line a command prints."""
    from epic.data.records import DataError

    if isinstance(error, DataError):
        return error.first_line()
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: no such file or folder (check the path)"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a mistake in its input is one line on stderr and exit status 2 (`--debug`: the traceback)."""
    from epic.compat import IncompatibleTransformers

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("EPIC_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    name = argv[0] if argv else ""
    try:
        if name == "train" and not {"-h", "--help"} & set(argv):
            return _train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (ValueError, OSError, IncompatibleTransformers) as error:
        if debug:
            raise
        print(f"epic {name}: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
