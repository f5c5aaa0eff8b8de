import importlib
import json

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from transformers import AutoModelForCausalLM, BloomConfig

import lemoe_peft
from lemoe_peft import LEMoEConfig, LEMoEModel
from lemoe_peft.config import DEFAULT_TARGET_MODULES

from .helpers import tiny_model


def test_importing_registers_the_peft_type_once():
    assert PeftType("LEMOE") is PeftType.LEMOE
    assert PEFT_TYPE_TO_CONFIG_MAPPING["LEMOE"] is LEMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LEMOE] is LEMoEModel
    importlib.reload(lemoe_peft.registration)
    lemoe_peft.register()  # a second registration is a no-op, not a KeyError
    assert list(PeftType).count(PeftType.LEMOE) == 1


def test_config_serialises_with_the_plain_type_name(tmp_path):
    config = LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LEMOE" and saved["expert_rank"] == 4
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LEMoEConfig) and loaded.expert_rank == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"expert_rank": 0}, "expert_rank"),
        ({"num_experts": -1}, "num_experts"),
        ({"top_k": 0}, "top_k"),
        ({"layer_depth": 0.0}, "layer_depth"),
        ({"layer_depth": 1.5}, "layer_depth"),
        ({"route_pooling": "max"}, "route_pooling"),
        ({"route_similarity": "l2"}, "route_similarity"),
        ({"expert_activation": "tanh"}, "expert_activation"),
        ({"route_threshold": 1.5}, "route_threshold"),
        ({"route_temperature": 0}, "route_temperature"),
        ({"route_subject_margin": -0.1}, "route_subject_margin"),
        ({"route_generated_tokens": "latest"}, "route_generated_tokens"),
        ({"route_subject_names": "sometimes"}, "route_subject_names"),
        ({"route_subject_name_tokens": 0}, "route_subject_name_tokens"),
        ({"route_subject_tokens": "dropped"}, "route_subject_tokens"),
        ({"route_whiten_rank": -2}, "route_whiten_rank"),
        ({"num_anchors": 3}, "anchors need at least one expert"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_bad_config_values_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LEMoEConfig(**kwargs)


def test_default_is_one_ffn_output_projection_at_the_configured_depth():
    model = get_peft_model(tiny_model("llama"), LEMoEConfig(task_type="CAUSAL_LM", layer_depth=0.5))
    assert list(model.base_model.lemoe_layers()) == ["model.layers.2.mlp.down_proj"]
    assert model.peft_config["default"].layers_to_transform == [2]


def _tiny_bloom():  # an architecture without a default target
    return AutoModelForCausalLM.from_config(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4))


def test_unsupported_model_type_without_targets_says_what_to_pass():
    with pytest.raises(ValueError, match="model_type 'bloom'.*Pass `target_modules`.*layers_to_transform"):
        get_peft_model(_tiny_bloom(), LEMoEConfig(task_type="CAUSAL_LM"))


def test_explicit_targets_work_for_any_model_type():
    config = LEMoEConfig(task_type="CAUSAL_LM", target_modules=["mlp.dense_4h_to_h"], layers_to_transform=[1])
    model = get_peft_model(_tiny_bloom(), config)
    assert list(model.base_model.lemoe_layers()) == ["transformer.h.1.mlp.dense_4h_to_h"]


def test_non_linear_targets_are_refused():
    config = LEMoEConfig(task_type="CAUSAL_LM", target_modules=["mlp"], layers_to_transform=[1])
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        get_peft_model(tiny_model("llama"), config)


def test_every_default_target_table_entry_has_a_tiny_model_test():
    from .helpers import TINY_CONFIGS

    assert set(DEFAULT_TARGET_MODULES) == set(TINY_CONFIGS)
