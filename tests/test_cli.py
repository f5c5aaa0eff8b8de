"""The ``lemoe`` command on a tiny model saved to disk: edit, resume, evaluate, inspect, and refuse bad input."""

import json

import pytest

from lemoe_peft.cli import main

from .helpers import tiny_model, tiny_tokenizer

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
        "edit_log.json",
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


def test_bad_input_gives_a_clear_error_and_exit_code(setup, capsys):
    (setup / "bad.json").write_text(json.dumps([{"prompt": "p", "target_new": ""}]))
    code = main(["edit", "--model", str(setup / "model"), "--data", str(setup / "bad.json"), "--out", str(setup / "o")])
    assert code == 2
    assert "record 0" in capsys.readouterr().err
    assert not (setup / "o").exists(), "nothing is written when the input is refused"
