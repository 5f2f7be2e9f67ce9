"""The `epic` argument parser: every command, its options and their defaults."""

from __future__ import annotations

import argparse

from epic import __version__
from epic.cli import commands, evaluation
from epic.cli.common import HelpFormatter, default_threads
from epic.compression.registry import method_names
from epic.models.presets import PRESETS

LAYER_HELP = "K, the first decoder layer that sees only the kept tokens (0: before the LLM)"
THREADS_HELP = "torch threads (default: $OMP_NUM_THREADS, else 1)"


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
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)


def _compression_arguments(parser: argparse.ArgumentParser, tokens_help: str) -> None:
    """--method, --tokens, --ratio and --layer, as `epic eval`, `show` and `chat` read them."""
    parser.add_argument("--tokens", help=tokens_help)
    parser.add_argument(
        "--ratio", type=float, help="instead of --tokens: the share of visual tokens to drop, in [0, 1)"
    )
    parser.add_argument("--layer", type=int, default=2, help=LAYER_HELP)


def build_parser() -> argparse.ArgumentParser:
    """Every command and option. Torch-free: choices that only a torch-importing registry can list (tasks,
    templates) are checked when the command runs, with the list in the one-line error."""
    methods = ", ".join(method_names())
    parser = argparse.ArgumentParser(
        prog="epic",
        description="Visual-token compression for LLaVA-family models.",
        epilog="`epic --debug COMMAND ...` shows the traceback of an error instead of its one-line message.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"epic {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (give it before the command)")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return subcommands.add_parser(name, formatter_class=HelpFormatter, **kwargs)

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
    demo.set_defaults(run=commands.demo)

    data = command("data", help="check LLaVA-format data; draw the built-in synthetic set")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser(
        "check",
        help="validate a LLaVA-format file and report every problem",
        description="Report every problem of a LLaVA-format JSON/JSONL file with its line or id, then a summary. "
        "Exits 1 when any row has a problem.",
        formatter_class=HelpFormatter,
    )
    check.add_argument("file", help="a LLaVA-format JSON (a list of rows) or JSONL file")
    check.add_argument("--images", help="the folder image paths are relative to")
    check.add_argument("--model", help="a LLaVA folder (processor + epic.json) to also check row lengths")
    check.add_argument("--template", help="conversation template (default: the one stored with --model)")
    check.add_argument("--max-length", type=int, default=2048, help="longest row in tokens, images counted")
    check.set_defaults(run=commands.data_check)

    synth = data_commands.add_parser(
        "synth",
        help="draw the built-in synthetic visual QA set (shapes)",
        description="Write train/val/test LLaVA-format JSON, a caption set and PNG images. Deterministic by seed.",
        formatter_class=HelpFormatter,
    )
    synth.add_argument("out_dir", help="folder to write into")
    synth.add_argument("--n-train", type=int, default=6000, help="training questions")
    synth.add_argument("--n-val", type=int, default=500, help="validation questions")
    synth.add_argument("--n-test", type=int, default=1500, help="test questions")
    synth.add_argument("--n-captions", type=int, default=2000, help="captions for projector pre-training")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--grid", type=int, default=3, help="cells per side of the grid the shapes sit on")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.set_defaults(run=commands.data_synth)

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
        default="shapes",
        help="how answers are scored: shapes (the built-in set) or a benchmark of epic.eval.tasks by its name "
        "(pope, gqa, ...; a name it lacks is refused with the list)",
    )
    evaluate.add_argument("--template", help="conversation template (default: the one stored with the model)")
    evaluate.add_argument(
        "--method", default="dart", help=f"compression method ({methods}), or none for every visual token"
    )
    _compression_arguments(
        evaluate, "kept visual tokens per image (default: N/9 of the image's); with --methods a comma-separated list"
    )
    evaluate.add_argument(
        "--methods",
        dest="grid_methods",
        help=f"a grid: these methods (comma-separated, of {methods}; name@K compresses at layer K, e.g. "
        "divprune@0 before the LLM) at every --tokens budget (the image's full count means no compression)",
    )
    evaluate.add_argument("--batch-size", type=int, default=16, help="questions per generate call (left-padded)")
    evaluate.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens")
    evaluate.add_argument("--out", default="epic-out/eval", help="folder for predictions, metrics and the grid")
    evaluate.add_argument("--restart", action="store_true", help="discard answers already in --out and start afresh")
    evaluate.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    evaluate.set_defaults(run=evaluation.evaluate)

    show = command(
        "show",
        help="draw the patches each method keeps on one image",
        description="Write one PNG: the image as the model sees it and, per method, the kept patches outlined and "
        "the dropped ones dimmed. Without --model a tiny random model is used (the mechanics, not a trained choice).",
    )
    show.add_argument("image", help="the image file")
    show.add_argument("--model", help="a LLaVA folder (default: a tiny random model)")
    show.add_argument("--template", help="conversation template (default: the one stored with the model)")
    show.add_argument(
        "--methods",
        default="dart,fastv,random",
        help=f"methods to draw, comma-separated ({methods}; name@K: at layer K)",
    )
    show.add_argument("--tokens", type=int, help="kept visual tokens per image (default: N/9 of the image's)")
    show.add_argument("--layer", type=int, default=2, help=LAYER_HELP)
    show.add_argument("--question", default="What is in the image?", help="the question the text-aware methods read")
    show.add_argument("--out", default="kept.png", help="the PNG to write")
    show.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    show.set_defaults(run=evaluation.show)

    bench = command(
        "bench",
        help="prefill and decoding cost per method and budget, KV cache and FLOPs, against no compression",
        description="Measure compression's cost and savings on a checkpoint or on a model built from a preset "
        "with random weights (e.g. llava-7b shapes, no download); a table, bench.json and bench.png.",
    )
    bench.add_argument("model", nargs="?", help="a LLaVA checkpoint (default: --preset)")
    bench.add_argument(
        "--preset",
        default="demo",
        help=f"model shape without MODEL, one of {', '.join(PRESETS)} (demo: 196 visual tokens, 512 wide, where "
        "savings show on a CPU; tiny: its timings are overhead; cpu-wide: 576 visual tokens, 1024 wide; llava-7b: "
        "LLaVA-1.5-7B's decoder)",
    )
    bench.add_argument(
        "--methods",
        default="dart,fastv,random",
        help=f"methods to measure, comma-separated ({methods}; name@K: at layer K, e.g. divprune@0 before the LLM)",
    )
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
    bench.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    bench.set_defaults(run=evaluation.bench)

    chat = command(
        "chat",
        help="talk about an image with a compressed model in the terminal (multi-turn, streamed, with costs)",
        description="A multi-turn conversation about one image; the image is compressed once at the first turn and "
        "later turns reuse the KV cache. Commands between turns: /tokens N, /method NAME, /image PATH, /reset, "
        "/quit. Each answer ends with a cost line.",
    )
    _model_arguments(chat)
    chat.add_argument("--image", required=True, help="the image to talk about")
    chat.add_argument("--method", default="dart", help=f"{methods}, or none (all visual tokens)")
    chat.add_argument("--tokens", type=int, help="visual tokens kept per image (default: N/9 of the image's)")
    chat.set_defaults(run=commands.chat)

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
    web.set_defaults(run=commands.web)

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
