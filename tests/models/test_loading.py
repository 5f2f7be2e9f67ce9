"""`epic.models.loading`: one loader for a LLaVA folder, its processor and its template, with one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from epic.models import loading
from epic.models.factory import EPIC_FILE
from epic.models.loading import TOKENIZER_TEMPLATE, load_llava, load_llava_model
from tests.chat_helpers import save_tiny_chat


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`model/` saved by epic (vicuna_v1 in epic.json) and `plain/`, the same folder without its epic.json."""
    folder = tmp_path_factory.mktemp("loading")
    save_tiny_chat(folder)
    shutil.copytree(folder / "model", folder / "plain")
    (folder / "plain" / EPIC_FILE).unlink()
    return folder


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_a_missing_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nothere: no such model folder") as error:
        load_llava(tmp_path / "nothere")
    one_line_error(error)


def test_a_folder_without_config_json_is_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"is not a model folder: it has no config\.json") as error:
        load_llava(tmp_path)
    one_line_error(error)


def test_a_model_of_another_type_is_refused_naming_its_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model, not a LLaVA model") as error:
        load_llava_model(tmp_path)
    one_line_error(error)


def test_the_stored_template_is_used_unless_one_is_named(saved):
    model, processor, template = load_llava(saved / "model")
    assert template.name == "vicuna_v1" and not model.training
    assert processor.image_token_id == model.config.image_token_id
    assert load_llava(saved / "model", "chatml").template.name == "chatml"
    assert load_llava(saved / "model", fallback_template="chatml").template.name == "vicuna_v1"  # stored wins


def test_a_folder_epic_did_not_save_takes_the_fallback_or_says_its_template_is_missing(saved):
    with pytest.raises(FileNotFoundError, match=r"epic\.json is missing: the checkpoint does not say") as error:
        load_llava(saved / "plain")
    one_line_error(error)
    assert load_llava(saved / "plain", fallback_template="chatml").template.name == "chatml"
    # the chat template save_llava stored in the tokenizer serves as the tokenizer's own
    assert load_llava(saved / "plain", fallback_template=TOKENIZER_TEMPLATE).template.name == TOKENIZER_TEMPLATE


def test_an_unknown_template_is_refused_before_the_weights_load(saved, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the template was checked")

    monkeypatch.setattr(loading, "load_llava_model", no_weights)
    with pytest.raises(ValueError, match=r"model: unknown template 'nope'; choose one of .*--template") as error:
        load_llava(saved / "model", "nope")
    one_line_error(error)


def test_model_options_reach_from_pretrained(saved):
    assert load_llava(saved / "model", dtype=torch.bfloat16).model.dtype == torch.bfloat16
    model = load_llava_model(saved / "model", attn_implementation="eager")
    assert model.config._attn_implementation == "eager" and not model.training


def test_pickled_weights_are_refused_in_one_line(saved, tmp_path):
    """A folder whose weights are only `pytorch_model.bin` is refused before anything is unpickled."""
    pickled = tmp_path / "pickled"
    shutil.copytree(saved / "model", pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(
        ValueError, match=r"pickled: no \*\.safetensors weights; epic loads no pickled weights"
    ) as error:
        load_llava_model(pickled)
    one_line_error(error)
    # training loads its model and its KD teacher through the same loader
    from epic.train.config import ModelArguments
    from epic.train.run import build_model
    from epic.train.teacher import load_teacher

    with pytest.raises(ValueError, match="epic loads no pickled weights"):
        build_model(ModelArguments(model=str(pickled)))
    with pytest.raises(ValueError, match="epic loads no pickled weights"):
        load_teacher(str(pickled), "float32", "sdpa", torch.device("cpu"))
