"""The ``lemoe`` command on a tiny model saved to disk: edit, resume, evaluate, inspect, and refuse bad input."""

import json

import pytest
import torch
from filelock import FileLock

import lemoe_peft
from lemoe_peft import LEMoEConfig
from lemoe_peft.cli import _editor_settings, build_parser, main

from .helpers import CHAT_TEMPLATE, tiny_model, tiny_tokenizer

RECORDS = [
    {
        "prompt": "paris is in",
        "target_new": "italy",
        "rephrase_prompt": "paris is the capital of",
        "locality_prompt": "the sky is",
        "locality_ground_truth": "blue",
    },
    {
        "prompt": "who wrote hamlet",
        "target_new": "goethe",
        "locality_prompt": "the grass is",
        "locality_ground_truth": "green",
    },
    {"prompt": "the nile flows through", "target_new": "brazil"},
]


@pytest.fixture
def setup(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS))
    return tmp_path


def test_edit_then_resume_then_eval_then_inspect(setup, capsys):
    edit = ["edit", "--model", str(setup / "model"), "--data", str(setup / "edits.json"), "--out", str(setup / "out")]
    assert (
        main(
            [
                *edit,
                "--batch-size",
                "2",
                "--max-steps",
                "40",
                "--learning-rate",
                "0.03",
                "--json",
                str(setup / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Edited 3 requests in 2 new experts" in printed
    results = json.loads((setup / "r.json").read_text())
    assert results["protocol"]["T"] == 3 and results["protocol"]["batch_size"] == 2
    assert results["protocol"]["generation"]["decoding"].startswith("greedy")
    row = f"Reliability   teacher-forced {results['rewrite_acc']:.3f}   generated {results['rewrite_gen_acc']:.3f}"
    assert row in printed, "both metric families, side by side"
    assert all("rewrite_gen_acc" in case and "locality_gen_acc" in case for case in results["cases"][:2])
    assert sorted(p.name for p in (setup / "out").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    assert main([*edit, "--batch-size", "2", "--no-eval"]) == 0  # the same command again: nothing left to do
    assert "Edited 0 requests in 0 new experts (3 already in" in capsys.readouterr().out

    assert (
        main(
            [
                "eval",
                "--model",
                str(setup / "model"),
                "--adapter",
                str(setup / "out"),
                "--data",
                str(setup / "edits.json"),
                "--no-generation",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "Locality      teacher-forced" in printed and "generated" not in printed

    assert main(["inspect", str(setup / "out")]) == 0
    assert "2 experts" in capsys.readouterr().out
    assert main(["inspect", str(setup / "out"), "--model", str(setup / "model"), "--prompt", "who wrote hamlet"]) == 0
    assert "this exact prompt was edited into expert" in capsys.readouterr().out


def test_edit_in_the_chat_form_and_evaluate_through_the_chat_template(setup, capsys):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(setup / "model")
    model, data, out = str(setup / "model"), str(setup / "edits.json"), setup / "out"
    assert main(["edit", "--model", model, "--data", data, "--out", str(out), "--chat-form", "--no-eval"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["route_chat_opening"] and config["route_chat_reply"], "the template's markers are in the adapter"
    assert config["edit_log"][0]["settings"]["chat_form"] is True
    eval_ = ["eval", "--model", model, "--adapter", str(out), "--data", data, "--no-generation"]
    assert main([*eval_, "--ask-in-chat", "--json", str(setup / "r.json")]) == 0
    assert json.loads((setup / "r.json").read_text())["protocol"]["prompts"] == "through the chat template"


def test_asking_in_chat_without_a_chat_template_is_refused_before_editing(setup, capsys):
    edit = ["edit", "--model", str(setup / "model"), "--data", str(setup / "edits.json"), "--out", str(setup / "out")]
    assert main([*edit, "--ask-in-chat"]) == 2
    assert "--ask-in-chat needs a chat template" in capsys.readouterr().err
    assert not (setup / "out").exists(), "nothing edited"


def test_bad_input_gives_a_clear_error_and_exit_code(setup, capsys):
    (setup / "bad.json").write_text(json.dumps([{"prompt": "p", "target_new": ""}]))
    code = main(["edit", "--model", str(setup / "model"), "--data", str(setup / "bad.json"), "--out", str(setup / "o")])
    assert code == 2
    assert "record 0" in capsys.readouterr().err
    assert not (setup / "o").exists(), "nothing is written when the input is refused"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if the command gets as far as loading a model."""
    import lemoe_peft.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(lemoe_peft.models, "load_model_and_tokenizer", refuse)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lemoe {lemoe_peft.__version__}"


def test_edit_help_comes_from_the_editor_settings(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["edit", "--help"])
    assert exit_.value.code == 0
    assert "--preserve-weight" in capsys.readouterr().out.replace("\n", " ")


def test_the_subject_lead_can_be_changed_or_turned_off_from_the_command_line():
    edit = ["edit", "--model", "m", "--data", "d.json", "--out", "o"]
    assert _editor_settings(build_parser().parse_args(edit)).subject_lead == "Tell me about {}"
    for lead in ("What is {}?", ""):
        assert _editor_settings(build_parser().parse_args([*edit, "--subject-lead", lead])).subject_lead == lead


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such model folder"),
        (["--out", "{tmp}/edits.json"], "--out {tmp}/edits.json is a file"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--device", "gpu0"], "--device gpu0 is not a torch device"),
    ],
    ids=["model", "out", "limit", "batch-size", "device"],
)
def test_bad_arguments_are_refused_before_any_model_loads(setup, capsys, no_model_loads, arguments, message):
    edit = {"--model": str(setup / "model"), "--data": str(setup / "edits.json"), "--out": str(setup / "out")}
    edit.update({arguments[0]: arguments[1].format(tmp=setup)})
    assert main(["edit", *(word for pair in edit.items() for word in pair)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and message.format(tmp=setup) in printed.err
    assert not (setup / "out").exists()


def test_inspect_prompt_without_model_is_refused_before_anything_runs(setup, capsys, no_model_loads):
    LEMoEConfig(task_type="CAUSAL_LM").save_pretrained(setup / "adapter")
    assert main(["inspect", str(setup / "adapter"), "--prompt", "who wrote hamlet"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == "lemoe inspect: --prompt needs --model (the base model it was made for).\n"


def test_edit_loads_the_model_with_the_given_dtype_and_device(setup, monkeypatch):
    import lemoe_peft.models

    calls = []

    def record(name, dtype=None, device=None):
        calls.append((dtype, device))
        raise ValueError("stop here")

    monkeypatch.setattr(lemoe_peft.models, "load_model_and_tokenizer", record)
    edit = ["edit", "--model", str(setup / "model"), "--data", str(setup / "edits.json"), "--out", str(setup / "o")]
    assert main([*edit, "--dtype", "bfloat16", "--device", "cpu"]) == 2
    assert calls == [(torch.bfloat16, "cpu")]


def test_a_second_edit_on_the_same_out_folder_is_refused(setup, capsys, no_model_loads):
    (setup / "out").mkdir()
    (setup / "out" / "adapter_config.json").write_text("{}")
    edit = ["edit", "--model", str(setup / "model"), "--data", str(setup / "edits.json"), "--out", str(setup / "out")]
    with FileLock(setup / "out.lock"):  # as a running `lemoe edit` holds it
        assert main(edit) == 2
    assert "another `lemoe edit` is writing" in capsys.readouterr().err
    assert [p.name for p in (setup / "out").iterdir()] == ["adapter_config.json"]
    assert (setup / "out" / "adapter_config.json").read_text() == "{}"
