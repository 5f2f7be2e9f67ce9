"""`epic` as an lmms-eval model: a transformers LLaVA checkpoint, optionally compressed, batched greedy generation.

    python -m lmms_eval --model epic --model_args pretrained=PATH,method=dart,tokens=64,layer=2 --tasks pope

Only `generate_until` is implemented (the generation tasks: POPE, MME, GQA, VQAv2, MMBench, ...); log-likelihood
tasks raise NotImplementedError. Needs `pip install 'epic-mllm[lmms]'` (lmms-eval).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from epic.data.templates import IMAGE_PLACEHOLDER, Turn
from epic.eval.runner import CompressionSettings, EvalItem, generate_answers
from epic.models.loading import load_llava


class EpicLmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        tokens: int | None = None,
        ratio: float | None = None,
        layer: int = 2,
        template: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 16,
        device: str = "cpu",
        **kwargs,
    ) -> None:
        super().__init__()
        model, self.processor, self.template = load_llava(pretrained, template)
        self.model = model.to(device)
        self.compression = None
        if method:
            self.compression = CompressionSettings(
                method,
                tokens=None if tokens is None else int(tokens),
                ratio=None if ratio is None else float(ratio),
                layer=int(layer),
            )
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        items = []
        max_new_tokens = self.max_new_tokens
        for index, request in enumerate(requests):
            context, generation, doc_to_visual, doc_id, task, split = request.args
            visuals = [visual for visual in doc_to_visual(self.task_dict[task][split][doc_id]) if visual is not None]
            text = context if IMAGE_PLACEHOLDER in context else IMAGE_PLACEHOLDER * len(visuals) + "\n" + context
            items.append(EvalItem(str(index), [Turn("user", text)], visuals, ""))
            max_new_tokens = int(generation.get("max_new_tokens", max_new_tokens))
        with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
            answers = generate_answers(
                self.model,
                self.processor,
                self.template,
                items,
                Path(folder) / "predictions.jsonl",
                self.compression,
                self.batch_size,
                max_new_tokens,
                progress=False,
            )
        return [answers[item.item_id] for item in items]

    def loglikelihood(self, requests):
        raise NotImplementedError("the epic model only generates (generate_until tasks)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the epic model answers single-round tasks")
