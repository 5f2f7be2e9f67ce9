"""The `epic` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from epic.cli import main
from epic.cli.commands import default_demo_model
from epic.demo import scaled_budgets

TORCH_FREE = "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"


def test_paper_budgets_scale_to_the_image():
    assert scaled_budgets(576) == [576, 192, 128, 64, 36]
    assert scaled_budgets(144) == [144, 48, 32, 16, 9]


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_train_help_names_every_training_mode(capsys, monkeypatch, argv):
    from epic.distill import MODES

    monkeypatch.setenv("COLUMNS", "400")  # no line wrapped inside a mode's name
    with pytest.raises(SystemExit):
        main(argv)
    listed = capsys.readouterr().out
    assert "kd-pretrain" in MODES
    for mode in MODES:
        assert mode in listed, mode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny saved LLaVA, a picture, three evaluation rows, a folder that is no model, and a Llama folder."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.chat_helpers import save_tiny_chat

    folder = tmp_path_factory.mktemp("cli")
    save_tiny_chat(folder)
    rows = [
        {
            "id": f"q{i}",
            "image": "scene.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the shape at the center?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for i in range(3)
    ]
    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "broken.json").write_text('[{"id": "q0",\n "image": "scene.png" "conversations": []}]')
    (folder / "empty").mkdir()
    (folder / "typo.yaml").write_text("model: tiny:llama\nmax_step: 3\n")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(folder / "llama")
    return folder


def eval_argv(folder, *extra: str, model: str = "model", data: str = "rows.json") -> list[str]:
    data_args = ["--data", str(folder / data), "--images", str(folder)]
    return ["eval", str(folder / model), *data_args, "--out", str(folder / "out"), "--restart", *extra]


MISTAKES = {  # argv (from the saved folder) -> what the one line must say
    "budget over the image": (lambda f: eval_argv(f, "--tokens", "100"), "epic eval: ", "larger than the image"),
    "unknown method": (lambda f: eval_argv(f, "--method", "nope"), "epic eval: ", "unknown compression method 'nope'"),
    "layer out of range": (lambda f: eval_argv(f, "--layer", "9"), "epic eval: ", "layer must be an integer in [0, 3]"),
    "ratio out of range": (lambda f: eval_argv(f, "--ratio", "1.5"), "epic eval: ", "ratio must lie in [0, 1)"),
    "tokens not a number": (lambda f: eval_argv(f, "--tokens", "seven"), "epic eval: ", "--tokens takes whole numbers"),
    "budget with none": (lambda f: eval_argv(f, "--method", "none", "--tokens", "7"), "epic eval: ", "drop --tokens"),
    "missing data": (lambda f: eval_argv(f, data="nothere.json"), "epic eval: ", "nothere.json: no such file"),
    "missing model": (lambda f: eval_argv(f, model="nothere"), "epic eval: ", "nothere: no such model folder"),
    "not a model folder": (lambda f: eval_argv(f, model="empty"), "epic eval: ", "has no config.json"),
    "not a LLaVA model": (lambda f: eval_argv(f, model="llama"), "epic eval: ", "holds a 'llama' model, not a LLaVA"),
    "missing images": (
        lambda f: ["eval", str(f / "model"), "--data", str(f / "rows.json"), "--out", str(f / "out"), "--restart"],
        "epic eval: ",
        "3 problem(s), the first: item 0 (id q0): missing image",
    ),
    "unknown task": (lambda f: eval_argv(f, "--task", "nope"), "epic eval: ", "--task 'nope' is not one of shapes,"),
    "grid without budgets": (lambda f: eval_argv(f, "--methods", "dart"), "epic eval: ", "needs --tokens"),
    "show: missing image": (lambda f: ["show", str(f / "nothere.png")], "epic show: ", "nothere.png: no such file"),
    "show: budget over the image": (
        lambda f: [
            "show",
            str(f / "scene.png"),
            "--model",
            str(f / "model"),
            "--tokens",
            "100",
            "--out",
            str(f / "k.png"),
        ],
        "epic show: ",
        "larger than the image",
    ),
    "bench: unknown preset": (lambda f: ["bench", "--preset", "nope"], "epic bench: ", "is not one of tiny, demo,"),
    "bench: tokens not numbers": (lambda f: ["bench", "--tokens", "a,b"], "epic bench: ", "whole numbers"),
    "bench: one new token": (
        lambda f: ["bench", "--new-tokens", "1"],
        "epic bench: ",
        "--new-tokens 1: decoding speed needs at least 2 new tokens",
    ),
    "data check: missing file": (lambda f: ["data", "check", str(f / "nothere.json")], "epic data: ", "no such file"),
    "chat: missing model": (
        lambda f: ["chat", str(f / "nothere"), "--image", str(f / "scene.png")],
        "epic chat: ",
        "no such model folder",
    ),
    "web: remote host": (lambda f: ["web", "--host", "0.0.0.0"], "epic web: ", "add --allow-remote"),
    "train: missing recipe": (lambda f: ["train", str(f / "nothere.yaml")], "epic train: ", "nothere.yaml: no such"),
    "train: misspelt recipe key": (
        lambda f: ["train", str(f / "typo.yaml")],
        "epic train: ",
        "unknown option(s) ['max_step'] (did you mean max_steps?); `epic train --options` lists",
    ),
    "train: misspelt option": (
        lambda f: ["train", "--model", "tiny:llama", "--max_step", "3"],
        "epic train: ",
        "(did you mean --max_steps?); `epic train --options` lists",
    ),
    "train: unknown mode": (
        lambda f: ["train", "--model", "tiny:llama", "--mode", "nope", "--output_dir", str(f / "run")],
        "epic train: ",
        "unknown training mode 'nope'",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_an_ordinary_mistake_is_one_line_naming_it_and_exit_status_2(saved, capsys, mistake):
    make_argv, prefix, says = MISTAKES[mistake]
    assert main(make_argv(saved)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # earlier lines can only be progress bars (loading weights)
    assert last.startswith(prefix) and says in last, last
    assert all("it/s" in line or "%|" in line for line in err.strip().splitlines()[:-1])


def test_data_check_keeps_the_json_errors_line_and_column(saved, capsys):
    assert main(["data", "check", str(saved / "broken.json")]) == 1
    out = capsys.readouterr().out
    assert "line 2: malformed JSON: Expecting ',' delimiter (column 23)" in out  # after "scene.png"


def test_debug_shows_the_traceback_instead(saved):
    with pytest.raises(ValueError, match="no such file"):
        main(["--debug", "data", "check", str(saved / "nothere.json")])


def test_version_and_defaults_in_help(capsys, monkeypatch):
    from epic import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"epic {__version__}"
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    for shown in (
        "--method METHOD compression method (dart, dart_pre, divprune, fastv, pdrop, random, visionzip), or none "
        "for every visual token (default: dart)",
        "--layer LAYER K, the first decoder layer that sees only the kept tokens (0: before the LLM) (default: 2)",
        "--ratio RATIO instead of --tokens",
        "--out OUT folder for predictions, metrics and the grid (default: epic-out/eval)",
        "--threads THREADS torch threads",
        "(default: shapes)",
    ):
        assert shown in listed, shown


def test_train_options_have_their_own_usage_sections_and_each_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["train", "--options"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("usage: epic train [RECIPE.yaml] [--key value ...]")
    for section in ("\nmodel:", "\ndata:", "\ncompression and distillation:"):
        assert section in listed, section
    options = " ".join(listed.split()).split(" --")[1:]
    assert [option for option in options if option.count("default:") > 1] == []
    assert "--layer LAYER" in listed and "(default: 2)" in listed and "(default: )" not in listed


def test_the_parser_and_its_help_import_neither_torch_nor_transformers():
    code = f"import sys; from epic.cli import build_parser; build_parser().format_help(); {TORCH_FREE}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["demo"],
        ["data"],
        ["data", "check"],
        ["data", "synth"],
        ["eval"],
        ["show"],
        ["bench"],
        ["chat"],
        ["web"],
        ["train"],
    ],
)
def test_every_commands_help_imports_neither_torch_nor_transformers(command):
    code = (
        "import sys\nfrom epic.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as done:\n"
        f"    assert done.code == 0, done.code\n{TORCH_FREE}"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: epic")


def test_method_names_in_help_and_checks_come_from_the_registry(monkeypatch, capsys):
    """A method registered after the fact is listed by every --method help and accepted by the commands' check."""
    from dataclasses import dataclass

    from epic.cli.common import compression_of
    from epic.compression.registry import METHODS

    @dataclass
    class KeepFirst:
        needs_features = False

    monkeypatch.setitem(METHODS, "keepfirst", KeepFirst)
    for command in ("eval", "show", "bench", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        listed = " ".join(capsys.readouterr().out.split())
        assert "dart, dart_pre, divprune, fastv, keepfirst, pdrop, random, visionzip" in listed, command
    settings, words = compression_of("keepfirst", 4, None, 2, 64)
    assert settings.method == "keepfirst" and words.startswith("keepfirst, 4 of 64")
    with pytest.raises(
        ValueError, match="unknown compression method 'nope': choose one of dart, dart_pre, divprune, fastv, keepfirst"
    ):
        compression_of("nope", 4, None, 2, 64)


def test_default_demo_model_prefers_tcd_then_stage1_then_base(tmp_path):
    with pytest.raises(ValueError, match="run `epic demo` first, or pass a LLaVA model folder"):
        default_demo_model(tmp_path)
    for name in ("base", "stage1", "tcd"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
        assert default_demo_model(tmp_path) == tmp_path / "models" / name


def test_bench_presets_in_help_come_from_the_presets(monkeypatch, capsys):
    """A preset added to epic.models.presets is listed by `epic bench --help` (the parser reads the table)."""
    from epic.models.presets import PRESETS, TinyLlavaSpec

    monkeypatch.setitem(PRESETS, "wide-test", TinyLlavaSpec(hidden_size=128))
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "one of tiny, demo, cpu-wide, llava-7b, wide-test" in " ".join(capsys.readouterr().out.split())
