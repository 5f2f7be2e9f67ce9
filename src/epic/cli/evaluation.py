"""`epic eval`, `epic show` and `epic bench`: accuracy under compression, what is kept, and what it costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epic.cli.common import budget_list, compression_of, existing, layer_words, method_list, one_of
from epic.models.loading import llava_folder, load_llava, load_llava_model


def evaluate(args: argparse.Namespace) -> int:
    import torch

    from epic.data.dataset import image_token_count
    from epic.eval.provenance import recorded_settings
    from epic.eval.runner import generate_answers
    from epic.eval.tasks import LOADERS, TASKS, chance_level

    torch.set_num_threads(args.threads)
    one_of(args.task, TASKS, "--task")
    llava_folder(args.model)
    data = existing(args.data, "--data")
    model, processor, template = load_llava(args.model, args.template)
    processor.tokenizer.padding_side = "left"
    items = LOADERS[args.task](data, args.images and Path(args.images))
    image_tokens = image_token_count(processor)
    out = Path(args.out)
    rows = f"{len(items)} {args.task} items of {data}"
    if args.grid_methods:
        return evaluate_grid(args, model, processor, template, items, image_tokens, rows)
    tokens = None if args.tokens is None else budget_list(args.tokens)[0]
    compression, words = compression_of(args.method, tokens, args.ratio, args.layer, image_tokens)
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
    chance = chance_level(args.task, items)
    if chance is not None:
        print(f"{'chance':<12} {chance:>8.2f}  (overall, a uniform guess among each question's answers)")
    print(f"predictions: {path}, metrics: {out / 'metrics.json'}")
    return 0


def evaluate_grid(args: argparse.Namespace, model, processor, template, items, image_tokens: int, rows: str) -> int:
    """`epic eval --methods A,B --tokens N1,N2,...`: every method at every budget, a table, grid.json and a plot."""
    from epic.eval.grid import grid_table, plot_grid, run_grid
    from epic.eval.tasks import chance_level

    if not args.tokens:
        raise ValueError(f"a grid (--methods) needs --tokens, e.g. --tokens {image_tokens},{image_tokens // 9}")
    budgets = budget_list(args.tokens)
    methods = method_list(args.grid_methods, args.layer)
    out = Path(args.out)
    print(
        f"epic eval: {args.model} | {', '.join(methods)} at {args.tokens} of {image_tokens} visual tokens from "
        f"{layer_words(methods, args.layer)} | {rows} | into {out}"
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
    device = next(model.parameters()).device.type
    title = f"{args.model}: {args.task}, {len(items)} items, layer {args.layer}, {device}"
    plot_grid(grid, out / "grid.png", title=title, chance=chance_level(args.task, items))
    print(table)
    print(f"table: {out / 'grid.md'}, plot: {out / 'grid.png'}")
    return 0


def show(args: argparse.Namespace) -> int:
    import torch

    from epic.compression import default_tokens
    from epic.data.dataset import image_token_count
    from epic.data.shapes import SynthConfig, vocabulary_texts
    from epic.data.templates import get_template
    from epic.eval.show import draw_kept, kept_patches
    from epic.models.factory import build_tiny_llava_with_processor
    from epic.models.tiny import TinyLlavaSpec

    torch.set_num_threads(args.threads)
    image = existing(args.image, "IMAGE")
    if args.model:
        model, processor, template = load_llava(args.model, args.template)
    else:  # a tiny random model: shows the mechanics, not what a trained model would keep
        spec = TinyLlavaSpec(image_size=84, patch_size=6)
        model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), spec)
        template = get_template("vicuna_v1")
    image_tokens = image_token_count(processor)
    tokens = default_tokens(image_tokens) if args.tokens is None else args.tokens
    methods = method_list(args.methods, args.layer)
    name = args.model or "a tiny random model"
    where = layer_words(methods, args.layer)
    print(f"epic show: {name} | {', '.join(methods)}, {tokens} of {image_tokens} visual tokens from {where}")
    image, results = kept_patches(model, processor, template, image, args.question, methods, tokens, args.layer)
    draw_kept(image, results, args.question).save(args.out)
    print(f"question: {args.question}")
    for result in results:
        print(f"  {result.method:<10} kept {len(result.patches)} of {image_tokens}: {result.answer!r}")
    print(f"picture: {args.out}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from epic.eval.bench import (
        bench_settings,
        check_bench_options,
        format_bench,
        plot_bench,
        run_bench,
        synthetic_prompt,
    )
    from epic.models.presets import PRESETS
    from epic.models.tiny import build_tiny_llava

    torch.set_num_threads(args.threads)
    one_of(args.preset, PRESETS, "--preset")
    check_bench_options(args.new_tokens, args.repeats)
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = load_llava_model(args.model, dtype=dtype, attn_implementation=args.attn)
    else:
        model = build_tiny_llava(PRESETS[args.preset], attn_implementation=args.attn, dtype=dtype)
    model = model.to(args.device).eval()
    inputs = synthetic_prompt(model, args.text_tokens, args.batch)
    budgets, methods = budget_list(args.tokens), method_list(args.methods, args.layer)
    name = args.model or f"preset {args.preset} (random weights)"
    settings = bench_settings(
        model, inputs, model=name, repeats=args.repeats, new_tokens=args.new_tokens, layer=args.layer
    )
    threads = settings["threads"]
    where = f"{settings['device']} {settings['dtype']} {settings['attn']}, {threads} thread{'s' * (threads > 1)}"
    print(
        f"epic bench: {name} | {where} | batch {settings['batch']}, {settings['prompt_tokens']} tokens of which "
        f"{settings['visual_tokens']} visual | {','.join(methods)} at {','.join(map(str, budgets))} from "
        f"{layer_words(methods, args.layer)} | {args.repeats} repeats"
    )
    rows = run_bench(model, inputs, methods, budgets, args.layer, args.repeats, args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings, "rows": [asdict(row) for row in rows]}
    (out / "bench.json").write_text(json.dumps(record, indent=1))
    plot_bench(rows, out / "bench.png", title=f"prefill cost, {name}, batch {settings['batch']}\n{where}")
    print(format_bench(rows))
    print(f"table: {out / 'bench.json'}, plot: {out / 'bench.png'}")
    return 0
