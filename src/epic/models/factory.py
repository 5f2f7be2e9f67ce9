"""A complete tiny LLaVA: model, word-level tokenizer and processor, saved as a standard transformers folder.

The tokenizer is fitted to a given list of texts (the synthetic set's vocabulary plus the templates' own words) and
carries the special tokens `<pad> <s> </s> <unk> <image> <|im_start|> <|im_end|>` and epic's ChatML as its
`chat_template`. The folder loads back with `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained`, offline. The conversation template used to train is stored beside them by name in
`epic.json` (so evaluation cannot use another) and as the processor's Jinja `chat_template`, so that plain
`processor.apply_chat_template` on an image conversation gives the ids training saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from epic.data.templates import BUILTIN_TEMPLATES, Turn, get_template
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]
EPIC_FILE = "epic.json"


def _template_texts() -> list[str]:
    turns = [Turn("user", "q"), Turn("assistant", "a")]
    return ["".join(text for text, _ in template.render(turns, "")) for template in BUILTIN_TEMPLATES.values()] + [
        "user assistant system"
    ]


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation run of `texts` and the templates."""
    splitter = pre_tokenizers.Whitespace()
    words = sorted({word for text in [*texts, *_template_texts()] for word, _ in splitter.pre_tokenize_str(text)})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"].chat_template()
    return tokenizer


def tiny_processor(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A LLaVA processor: CLIP-style image processing at the tower's resolution, one `<image>` = N tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_tiny_llava_with_processor(
    texts: list[str], spec: TinyLlavaSpec | None = None, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny LLaVA whose vocabulary and special ids come from a word tokenizer fitted to `texts`."""
    tokenizer = word_tokenizer(texts)
    spec = replace(
        spec or TinyLlavaSpec(),
        vocab_size=len(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_tiny_llava(spec, seed=seed, attn_implementation=attn_implementation)
    return model, tiny_processor(spec, tokenizer)


@contextmanager
def chat_template_for_saving(processor, template: str) -> Iterator[None]:
    """Within the block, `processor` and its tokenizer carry the Jinja chat template of epic's template `template`
    (so a folder saved there renders conversations, image content parts included, exactly as training did); after
    it, their own again, so saving never changes what a live processor renders."""
    tokenizer = processor.tokenizer
    own = processor.chat_template, tokenizer.chat_template
    chat_template = get_template(template, tokenizer).chat_template()
    processor.chat_template = tokenizer.chat_template = chat_template
    try:
        yield
    finally:
        processor.chat_template, tokenizer.chat_template = own


def write_template(folder: Path, template: str) -> None:
    """Record the conversation template beside a checkpoint (`epic.json`)."""
    (Path(folder) / EPIC_FILE).write_text(json.dumps({"template": template}, indent=1))


def save_llava(model, processor, folder: Path, template: str) -> None:
    """Save model (safetensors), processor (with the template's chat template, see `chat_template_for_saving`) and
    the name of the conversation template as one folder. Re-saving a checkpoint this way refreshes its chat
    template."""
    folder = Path(folder)
    model.save_pretrained(folder)
    with chat_template_for_saving(processor, template):
        processor.save_pretrained(folder)
    write_template(folder, template)


def saved_template(folder: Path) -> str:
    """The conversation template a checkpoint was trained with (from its `epic.json`)."""
    path = Path(folder) / EPIC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint does not say which conversation template it uses")
    return json.loads(path.read_text())["template"]
