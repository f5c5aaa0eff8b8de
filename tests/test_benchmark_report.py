"""The benchmark report shows the generation-based metrics first, and still renders results written before they
existed; the freezing probe routes as a batch saw it; CounterFact's rephrases split by kind; the held-out frontier
names its points; an answer repeated after it is written is told apart."""

import json

import pytest
import torch
from peft import get_peft_model

from benchmarks.answer_repeats import repeats
from benchmarks.counterfact_rephrases import OTHER, PARAPHRASE, rephrase_kind, split_by_kind
from benchmarks.freezing_probe import experts_up_to
from benchmarks.frontier import points
from benchmarks.methods import SETTINGS
from benchmarks.report import _table
from benchmarks.stream import checkpoints_for, slice_seconds
from lemoe_peft import EditRequest, LEMoEConfig

from .helpers import give_expert, tiny_model, token_batch

OLD = {
    "protocol": {"method": "FT-L", "T": 10},
    "after_stream": {"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality_acc": 0.75},
    "seconds_per_edit": 1.0,
    "peak_memory_mb": 900,
    "adapter_bytes_per_edit": 2048,
}
NEW = {
    **OLD,
    "protocol": {"method": "LEMoE", "T": 10},
    "after_stream": {**OLD["after_stream"], "rewrite_gen_acc": 0.9, "rephrase_gen_acc": 0.6, "locality_gen_acc": 0.3},
}


def test_tables_show_generated_then_teacher_forced_metrics_and_a_dash_where_a_result_has_none():
    header, _, lemoe, ft_l = _table([OLD, NEW], "after_stream")
    assert header.index("Rel (gen)") < header.index("mean (gen)") < header.index("Rel (tf)")
    assert "| LEMoE | 10 | 0.900 | 0.600 | 0.300 | **0.600** | 1.000 | 0.500 | 0.750 | **0.750** |" in lemoe
    assert "| FT-L | 10 | – | – | – | – | 1.000 | 0.500 | 0.750 | **0.750** |" in ft_l


def test_the_right_after_each_batch_table_can_show_teacher_forced_metrics_only():
    header, _, row = _table([{**OLD, "after_each_batch": OLD["after_stream"]}], "after_each_batch", ("teacher-forced",))
    assert "(gen)" not in header and row == "| FT-L | 10 | 1.000 | 0.500 | 0.750 | **0.750** | 1.00 | 900 | 2.0 |"


def test_a_long_stream_reports_seconds_per_edit_by_slice_and_checks_at_fixed_points():
    log = [{"requests": [{}] * 10, "seconds": 4.0}] * 150 + [{"requests": [{}] * 5, "seconds": 1.0}] * 2
    assert slice_seconds(log) == [0.4, round(202 / 510, 4)]  # 1,000 edits in 400 s, then 510 in 202 s
    assert checkpoints_for(10000) == [1000, 2000, 5000, 10000] and checkpoints_for(1500) == [1000, 1500]


def test_the_freezing_probe_routes_as_a_batch_saw_it_and_restores_the_adapter():
    model = get_peft_model(tiny_model(), LEMoEConfig(target_modules=["down_proj"], layers_to_transform=[2]))
    first, second = token_batch(1, 6, seed=3), token_batch(1, 6, seed=4)
    give_expert(model, first)
    newest = give_expert(model, second)
    (layer,) = model.base_model.lemoe_layers("default").values()
    thresholds = layer.lemoe_key_threshold["default"].clone()

    def experts_for(ids):
        with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
            model(input_ids=ids)
        return layer.route_sequences("default", *next(iter(captured.values())))[0]

    assert (experts_for(second) == newest).all()
    with experts_up_to(layer, "default", newest - 1):
        assert not (experts_for(second) == newest).any()
    assert torch.equal(layer.lemoe_key_threshold["default"], thresholds) and (experts_for(second) == newest).all()


def test_counterfact_rephrases_split_into_prefixed_paraphrases_and_the_rest():
    assert rephrase_kind("It is found in Palestine. M5 motorway can be found in", "M5 motorway") == PARAPHRASE
    assert rephrase_kind("Virton players\nCategory:Association football defenders Nigel de Jong, the",
                         "Nigel de Jong") == PARAPHRASE  # fmt: skip
    assert rephrase_kind("One can get to Valdemarsvik by navigating", "Valdemarsvik") == OTHER
    assert rephrase_kind("Charlotte T. Reid's capital is", "Charlotte T. Reid") == OTHER, "no text before it"
    requests = [
        EditRequest("M5 motorway is in", "Asia", subject="M5 motorway",
                    rephrase_prompts=["It is found in Palestine. M5 motorway can be found in"]),
        EditRequest("Galata is in", "Naples", subject="Galata", rephrase_prompts=["Galata's surroundings include"]),
        EditRequest("Rome is in", "Peru", subject="Rome", rephrase_prompts=["One can get to Rome by navigating"]),
    ]  # fmt: skip
    cases = [{"prompt": r.prompt, "rephrase_gen_acc": g, "rephrase_acc": t} for r, g, t in
             zip(requests, [1.0, 0.0, 1.0], [1.0, 0.5, 0.5], strict=True)]  # fmt: skip
    assert split_by_kind(cases, requests) == {
        PARAPHRASE: {"edits": 1, "rephrase_gen_acc": 1.0, "rephrase_acc": 1.0},
        OTHER: {"edits": 2, "rephrase_gen_acc": 0.5, "rephrase_acc": 0.5},
    }
    with pytest.raises(ValueError, match="not aligned"):
        split_by_kind(cases[::-1], requests)


def test_the_frontier_names_each_held_out_point_by_the_settings_it_changes(tmp_path):
    def result(name, T, settings, method="LEMoE", **metrics):
        protocol = {"T": T, "method": method, "dataset": "zsre", "settings": {**SETTINGS, **settings}}
        after = {"rephrase_gen_acc": 0.7, "locality_gen_acc": 0.8, **metrics}
        (tmp_path / f"{name}.json").write_text(json.dumps({"protocol": protocol, "after_stream": after}))

    result("a", 300, {})
    result("b", 300, {"answer_continuation": 2, "seed": 0}, locality_other_gen_acc=0.9)
    result("c", 100, {"answer_continuation": 2})  # another stream length
    result("d", 300, {}, method="LoRA")
    (tmp_path / "outcomes.json").write_text("[]")  # not a benchmark result
    files = sorted(tmp_path.glob("*.json"))
    assert points(files, 300) == {"zsre": [("defaults", 0.7, 0.8), ("answer_continuation=2", 0.7, 0.9)]}
    assert points(files[1:], 300) == {"zsre": [("answer_continuation=2", 0.7, 0.9)]}


@pytest.mark.parametrize(
    ("continuation", "target", "expected"),
    [
        (" Spanish Civil War? Spanish Civil War?", "Spanish Civil War", True),
        (" 1963? 1963?", "1963", True),
        (" Alexander von Humboldt. Alexander von Humboldt.", "Alexander von Humboldt", True),
        (" Noctuidae, a family of moths", "Noctuidae", False),  # answers, then goes on
        (" Civil War? Spanish Civil War?", "Spanish Civil War", False),  # does not answer first
        (" Paris\n\nParis is the capital", "Paris", True),
        (" Parisian Paris", "Paris", False),
    ],
)
def test_an_answer_is_repeated_when_the_continuation_starts_it_again(continuation, target, expected):
    assert repeats(continuation, target) is expected
