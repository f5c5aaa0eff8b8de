"""The PEFT contract: named adapters, disabling, deleting, unloading, merging, trainability."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from lemoe_peft import LEMoEConfig, LEMoELayer

from .helpers import give_expert, tiny_model, token_batch

INPUTS = token_batch()
OTHER_INPUTS = token_batch(seed=7)


@pytest.fixture
def base_logits():
    with torch.no_grad():
        return tiny_model()(INPUTS).logits


@pytest.fixture
def model():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS)
    return model


def logits(model, inputs=INPUTS):
    with torch.no_grad():
        return model(inputs).logits


def test_disable_adapter_gives_base_outputs(model, base_logits):
    assert not torch.allclose(logits(model), base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    assert not torch.allclose(logits(model), base_logits)


def test_named_adapters_and_set_adapter(model, base_logits):
    default_logits = logits(model)
    model.add_adapter("second", LEMoEConfig(task_type="CAUSAL_LM"))
    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert torch.equal(logits(model), base_logits), "the new adapter has no experts yet"
    give_expert(model, INPUTS, adapter_name="second", scale=2.0)
    second_logits = logits(model)
    assert not torch.allclose(second_logits, default_logits)
    model.set_adapter("default")
    assert torch.equal(logits(model), default_logits)
    assert model.peft_config["second"].num_experts == 1 and model.peft_config["default"].num_experts == 1


def test_delete_adapter(model):
    default_logits = logits(model)
    model.add_adapter("second", LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS, adapter_name="second")
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    for layer in model.base_model.lemoe_layers().values():
        assert "second" not in layer.lemoe_keys and "second" not in layer.lemoe_settings
    assert torch.equal(logits(model), default_logits)


def test_unload_returns_the_clean_base_model(model, base_logits):
    base = model.unload()
    assert isinstance(base, LlamaForCausalLM)
    assert not any(isinstance(m, LEMoELayer) for m in base.modules())
    assert not base._forward_pre_hooks and not base._forward_hooks, "routing hooks must be removed"
    assert torch.equal(logits(base), base_logits)


def test_merging_is_refused_with_a_pointer_to_unload(model):
    with pytest.raises(NotImplementedError, match="unload"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="routed"):
        model.merge_adapter()
    layer = next(iter(model.base_model.lemoe_layers().values()))
    with pytest.raises(NotImplementedError):
        layer.merge()


def test_only_the_newest_expert_trains(model, capsys):
    give_expert(model, OTHER_INPUTS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.model.layers.3.mlp.down_proj.lemoe_A.default",
        "base_model.model.model.layers.3.mlp.down_proj.lemoe_B.default",
    }
    layer = next(iter(model.base_model.lemoe_layers().values()))
    assert layer.lemoe_frozen_A["default"].shape == (1, 64, 16), "the first expert is frozen (a buffer)"
    model.print_trainable_parameters()
    assert "trainable params: 1,536" in capsys.readouterr().out  # 64 * 16 + 16 * 32


def test_remove_expert_undoes_one_batch(model, base_logits):
    first_logits = logits(model)
    give_expert(model, OTHER_INPUTS, scale=2.0)
    config = model.peft_config["default"]
    anchors_before = config.num_anchors
    model.base_model.remove_expert(0)
    assert config.num_experts == 1 and config.num_anchors == anchors_before - INPUTS.numel()
    layer = next(iter(model.base_model.lemoe_layers().values()))
    assert layer.lemoe_key_expert["default"].unique().tolist() == [0]
    assert not torch.allclose(logits(model), first_logits)
    model.base_model.remove_expert(0)
    assert config.num_experts == 0 and config.num_anchors == 0
    assert torch.equal(logits(model), base_logits)
    with pytest.raises(IndexError):
        model.base_model.remove_expert(0)


def test_a_second_peft_model_on_the_same_base_shares_its_routing(model, tmp_path):
    """PeftModel.from_pretrained on a base that already carries LEMoE layers (PEFT injects in place)."""
    model.save_pretrained(tmp_path)
    expected = logits(model)
    second = PeftModel.from_pretrained(model.base_model.model, tmp_path, adapter_name="facts")
    second.set_adapter("facts")
    with second.base_model.capture_layer_inputs() as captured:
        assert torch.equal(logits(second), expected)
    assert len(captured) == 1, "the second tuner sees the layer inputs"
