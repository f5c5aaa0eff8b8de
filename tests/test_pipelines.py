"""LEMoE inside existing fine-tuning pipelines: next to LoRA adapters, and trained by transformers' Trainer."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from lemoe_peft import LEMoEConfig

from .helpers import give_expert, tiny_model, token_batch

INPUTS = token_batch()


def _logits(model):
    with torch.no_grad():
        return model(INPUTS).logits


def test_lemoe_on_a_lora_merged_model_round_trips(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merged = lora.merge_and_unload()
    model = get_peft_model(merged, LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded_base = get_peft_model(
        tiny_model(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).merge_and_unload()
    assert torch.equal(_logits(PeftModel.from_pretrained(reloaded_base, tmp_path)), expected)


@pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT for a second time")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lemoe_beside_a_live_lora_adapter_on_the_same_ffn(tmp_path):
    torch.manual_seed(0)
    lora_config = LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    with_lora = inject_adapter_in_model(lora_config, tiny_model())
    lora_only = _logits(with_lora)
    model = get_peft_model(with_lora, LEMoEConfig(task_type="CAUSAL_LM"), adapter_name="edits")
    layer = model.base_model.lemoe_layers()["model.layers.3.mlp.down_proj"]
    assert type(layer.base_layer).__module__.startswith("peft.tuners.lora"), "LEMoE wraps the LoRA layer"
    assert torch.equal(_logits(model), lora_only), "without experts the LoRA model is unchanged"
    give_expert(model, INPUTS)
    edited = _logits(model)
    assert not torch.allclose(edited, lora_only)
    with model.disable_adapter():  # PEFT disables every tuner layer in the model, LoRA's too
        assert torch.equal(_logits(model), _logits(tiny_model()))
    model.save_pretrained(tmp_path, selected_adapters=["edits"])
    torch.manual_seed(0)
    fresh = inject_adapter_in_model(lora_config, tiny_model())
    assert torch.equal(_logits(PeftModel.from_pretrained(fresh, tmp_path / "edits", adapter_name="edits")), edited)


class _Sequences(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        ids = INPUTS[index % len(INPUTS)]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_trainer_trains_only_the_newest_expert(tmp_path):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, token_batch(seed=8))
    give_expert(model, INPUTS)
    layer = next(iter(model.base_model.lemoe_layers().values()))
    newest_before = layer.lemoe_B["default"].detach().clone()
    frozen_before = layer.lemoe_frozen_B["default"].clone()
    base_before = layer.base_layer.weight.detach().clone()
    loss_before = model(input_ids=INPUTS, labels=INPUTS).loss.item()

    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=3,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    Trainer(model=model, args=arguments, train_dataset=_Sequences()).train()

    assert not torch.equal(layer.lemoe_B["default"], newest_before), "the newest expert trained"
    assert torch.equal(layer.lemoe_frozen_B["default"], frozen_before), "earlier experts stay frozen"
    assert torch.equal(layer.base_layer.weight, base_before), "the base model stays frozen"
    assert model(input_ids=INPUTS, labels=INPUTS).loss.item() < loss_before


def _expert_gradients(model, padding_side, checkpointing):
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    ids = token_batch(3, 9, seed=4)
    mask = torch.ones_like(ids)
    pads = slice(0, 4) if padding_side == "left" else slice(5, None)
    mask[0, pads] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout in every run
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    layer = next(iter(model.base_model.lemoe_layers().values()))
    return [t.grad.clone() for t in layer.newest_expert("default")]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_type", ["llama", "opt"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_expert_gradients(model_type, padding_side, reentrant):
    model = get_peft_model(tiny_model(model_type), LEMoEConfig(task_type="CAUSAL_LM", top_k=2))
    give_expert(model, token_batch(3, 9, seed=5))
    give_expert(model, token_batch(3, 9, seed=4))  # two experts mixed by score: the gradients depend on the routing
    expected = _expert_gradients(model, padding_side, None)
    assert all(g.abs().sum() > 0 for g in expected)
    for got, want in zip(_expert_gradients(model, padding_side, reentrant), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT for a second time")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lora_then_lemoe_save_separate_adapters_that_reload_in_either_order(tmp_path, caplog):
    lora = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")  # before LEMoE wraps its layers (LoRA would save the wrapped names)
    with pytest.raises(ValueError, match="another name"):  # it would overwrite the LoRA's config
        get_peft_model(lora.get_base_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    with caplog.at_level("WARNING", logger="lemoe_peft"):
        model = get_peft_model(lora.get_base_model(), LEMoEConfig(task_type="CAUSAL_LM"), adapter_name="edits")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n), "the LoRA is frozen"
    stacked_layers_keep_trainability = hasattr(BaseTuner, "_get_adapter_state_dict")  # peft >= 0.21
    assert ("LEMoE froze" in caplog.text) == stacked_layers_keep_trainability, "LEMoE says when it freezes it"
    give_expert(model, INPUTS)
    edited = _logits(model)
    model.save_pretrained(tmp_path / "lemoe", selected_adapters=["edits"])
    lemoe_keys = set(load_file(tmp_path / "lemoe" / "edits" / "adapter_model.safetensors"))
    assert all(".lemoe_" in key for key in lemoe_keys), "the LEMoE file holds LEMoE tensors only"
    assert all("lora_" in key for key in load_file(tmp_path / "lora" / "adapter_model.safetensors"))

    lora_first = PeftModel.from_pretrained(tiny_model(), tmp_path / "lora").get_base_model()
    assert torch.equal(
        _logits(PeftModel.from_pretrained(lora_first, tmp_path / "lemoe" / "edits", adapter_name="edits")), edited
    )
    lemoe_first = PeftModel.from_pretrained(tiny_model(), tmp_path / "lemoe" / "edits", adapter_name="edits")
    PeftModel.from_pretrained(lemoe_first.get_base_model(), tmp_path / "lora")  # LoRA wraps the LEMoE layer
    torch.testing.assert_close(_logits(lemoe_first), edited)
    if not hasattr(BaseTuner, "_get_adapter_state_dict"):
        return  # peft < 0.21 has no hook to name the tensors of a wrapped LEMoE layer by the targeted module
    lemoe_first.save_pretrained(tmp_path / "again", selected_adapters=["edits"])
    assert set(load_file(tmp_path / "again" / "edits" / "adapter_model.safetensors")) == lemoe_keys, (
        "LEMoE keys stay valid"
    )
