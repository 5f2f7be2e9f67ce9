"""A tiny LLaVA with its own tokenizer and processor, saved and loaded as a standard transformers folder."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import epic
from epic.data.dataset import image_token_count
from epic.data.encoding import encode_prompt
from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.data.templates import BUILTIN_TEMPLATES, Turn, get_template
from epic.models.factory import build_tiny_llava_with_processor, save_llava, saved_template
from epic.models.tiny import TinyLlavaSpec

SPEC = TinyLlavaSpec(text_model="qwen2", image_size=48, patch_size=6)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), SPEC)


def test_tokenizer_covers_the_synthetic_vocabulary(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    question = "Is the red circle to the left of the blue square? Answer yes or no."
    ids = tokenizer.encode(question, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == question.replace("?", " ?").replace(".", " .")
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_processor_expands_images_to_the_models_token_count(tiny):
    model, processor = tiny
    assert image_token_count(processor) == SPEC.image_tokens
    inputs = processor(images=Image.new("RGB", (48, 48), "red"), text="<image> What color is it ?", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == SPEC.image_tokens
    with torch.no_grad():
        model(**inputs)


def test_saved_folder_loads_offline_without_warnings(tiny, tmp_path, caplog):
    model, processor = tiny
    save_llava(model, processor, tmp_path, "chatml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
        loaded_processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert "missing" not in caplog.text.lower() and "unexpected" not in caplog.text.lower()
    assert saved_template(tmp_path) == "chatml"
    template = get_template(saved_template(tmp_path))
    turns = [Turn("user", "<image>\nWhat color is the shape at the center?")]
    ids = encode_prompt(turns, template, loaded_processor.tokenizer, loaded_processor.image_token_id, SPEC.image_tokens)
    pixels = loaded_processor.image_processor(Image.new("RGB", (48, 48), "red"), return_tensors="pt")["pixel_values"]
    batch = {"input_ids": torch.tensor([ids]), "pixel_values": pixels}
    with torch.no_grad(), epic.compress(loaded, "dart", tokens=8):
        compressed = loaded(**batch).logits
    with torch.no_grad(), epic.compress(model, "dart", tokens=8):
        expected = model(**batch).logits
    torch.testing.assert_close(compressed, expected)


def test_missing_template_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not say which conversation template"):
        saved_template(tmp_path)


@pytest.mark.parametrize("name", [*sorted(BUILTIN_TEMPLATES), "tokenizer"])
def test_saved_processor_renders_an_image_conversation_that_generate_answers(tiny, tmp_path, name):
    model, processor = tiny
    own = processor.chat_template, processor.tokenizer.chat_template
    save_llava(model, processor, tmp_path, name)
    assert (processor.chat_template, processor.tokenizer.chat_template) == own  # saving left the live one alone
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    image = Image.new("RGB", (48, 48), "red")
    question = [{"type": "image", "image": image}, {"type": "text", "text": "What color is the shape at the center?"}]
    messages = [{"role": "user", "content": question}]
    turns = [Turn("user", "<image>\nWhat color is the shape at the center?")]
    if name != "plain":  # the plain template takes one turn
        messages += [
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many circles are there?"},
        ]
        turns += [Turn("assistant", "red"), Turn("user", "How many circles are there?")]
    inputs = loaded_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    template = get_template(name, loaded_processor.tokenizer)
    ids = encode_prompt(turns, template, loaded_processor.tokenizer, loaded_processor.image_token_id, SPEC.image_tokens)
    assert inputs["input_ids"][0].tolist() == ids
    pixels = loaded_processor.image_processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    with torch.no_grad():
        answer = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
        first = loaded(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].argmax()
    assert answer[0, : len(ids)].tolist() == ids and answer.shape[1] > len(ids)
    assert answer[0, len(ids)] == first  # generate saw the image and the prompt exactly as epic builds them
