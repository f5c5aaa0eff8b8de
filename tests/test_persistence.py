"""Everything an adapter holds lives in adapter_config.json (with its edit log) and adapter_model.safetensors, reloads
bit-for-bit in a fresh process under any adapter name, and damaged or mismatched files are refused loudly."""

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lemoe_peft import LEMoEConfig

from .helpers import give_expert, sentence_marks, tiny_model, token_batch

INPUTS = token_batch()
CHAT_MARKERS = INPUTS[0, 2:4].tolist(), INPUTS[1, 4:6].tolist()  # found in the inputs, so they change the routing


@pytest.fixture
def saved(tmp_path):
    """A tiny base model saved to disk, and a two-expert LEMoE adapter for it with its logits."""
    tiny_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    model.base_model.set_token_marks(sentence_marks())
    model.base_model.set_chat_markers(*CHAT_MARKERS)
    give_expert(model, INPUTS)
    give_expert(model, token_batch(seed=5))
    model.peft_config["default"].edit_log = [{"expert": 0, "requests": []}, {"expert": 1, "requests": []}]
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        save_file({"logits": model(INPUTS).logits, "inputs": INPUTS}, tmp_path / "expected.safetensors")
    return tmp_path


def test_adapter_folder_holds_only_json_safetensors_and_the_card(saved):
    files = sorted(p.name for p in (saved / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    assert config["num_experts"] == 2 and config["num_anchors"] == 2 * INPUTS.numel()
    tensors = load_file(saved / "adapter" / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.model.layers.3.mlp.down_proj.lemoe_token_marks"], sentence_marks())
    assert config["route_vocab_size"] == len(sentence_marks())
    assert (config["route_chat_opening"], config["route_chat_reply"]) == CHAT_MARKERS
    assert tensors["base_model.model.model.layers.3.mlp.down_proj.lemoe_frozen_A"].shape == (1, 64, 4)
    keys = tensors["base_model.model.model.layers.3.mlp.down_proj.lemoe_keys"]
    assert keys.shape == (2 * INPUTS.numel(), 2 * 64)  # the mean and the token half
    card = (saved / "adapter" / "README.md").read_text()
    assert "Experts: 2 (rank 4)" in card and str(saved / "base") in card and "import lemoe_peft" in card


def test_fresh_process_reload_under_another_name_is_bit_exact(saved):
    script = textwrap.dedent(
        f"""
        import torch, lemoe_peft
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(saved / "expected.safetensors")!r})
        base = AutoModelForCausalLM.from_pretrained({str(saved / "base")!r})
        model = PeftModel.from_pretrained(base, {str(saved / "adapter")!r}, adapter_name="renamed")
        assert model.peft_config["renamed"].edit_log[1]["expert"] == 1
        with torch.no_grad():
            assert torch.equal(model(expected["inputs"]).logits, expected["logits"]), "logits differ"
        print("bit-exact")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "bit-exact" in result.stdout


def test_auto_peft_model_loads_the_base_and_the_adapter(saved):
    model = AutoPeftModelForCausalLM.from_pretrained(saved / "adapter")
    expected = load_file(saved / "expected.safetensors")
    with torch.no_grad():
        assert torch.equal(model(expected["inputs"]).logits, expected["logits"])


def test_loading_onto_a_base_model_of_another_shape_is_refused(saved):
    other = AutoModelForCausalLM.from_config(
        tiny_model().config.__class__(**{**tiny_model().config.to_dict(), "intermediate_size": 48})
    )
    with pytest.raises((ValueError, RuntimeError), match="does not match|size mismatch"):
        PeftModel.from_pretrained(other, saved / "adapter")


def test_truncated_weights_are_refused(saved):
    weights = saved / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


@pytest.mark.parametrize("header", [b"[]", b'{"x": {"dtype": "F32"}}', b'{"x": 1}'])
def test_a_corrupt_header_is_refused_with_a_clear_message(saved, header):
    weights = saved / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="is corrupt"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused(saved):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (saved / "adapter" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="is corrupt"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


def test_a_file_missing_a_tensor_is_refused(saved):
    weights = saved / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if not k.endswith("lemoe_keys")}, weights)
    with pytest.raises(ValueError, match=r"lacks \['lemoe_keys'\]"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


def test_an_adapter_of_an_earlier_format_is_refused_saying_so(saved):
    weights = saved / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    projection = next(k for k in tensors if k.endswith("lemoe_route_projection"))
    tensors[projection.replace("projection", "basis")] = tensors.pop(projection)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="written by an earlier lemoe-peft.*Nothing was loaded"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


def test_an_adapter_saved_before_subjects_had_several_keys_or_names_loads_each_key_as_its_own_unnamed_subject(tmp_path):
    config = LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4, route_subject_names="off")  # keys, as then
    model = get_peft_model(tiny_model(), config)
    give_expert(model, INPUTS, subject_position=2)
    give_expert(model, token_batch(seed=5), subject_position=3)
    with torch.no_grad():
        expected = model(INPUTS).logits
    model.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    del fields["route_subject_names"], fields["route_subject_name_tokens"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith(("lemoe_subject_alias", "lemoe_subject_names"))}, weights
    )
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    (layer,) = loaded.base_model.lemoe_layers().values()
    assert layer.lemoe_subject_alias["default"].tolist() == [0, 1]
    assert (layer.lemoe_subject_names["default"] == -1).all() and layer.lemoe_subject_names["default"].shape == (2, 8)
    assert loaded.peft_config["default"].route_subject_names == "off"
    with torch.no_grad():
        assert torch.equal(loaded(INPUTS).logits, expected)


def test_subject_names_save_and_reload_and_route_as_before(tmp_path):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_subject_names="only"))
    give_expert(model, INPUTS, subject_position=2)
    (layer,) = model.base_model.lemoe_layers().values()
    layer.lemoe_subject_names["default"][0, -2:] = INPUTS[0, 1:3]
    with torch.no_grad():
        expected = model(INPUTS).logits
        with model.disable_adapter():
            assert not torch.allclose(model(INPUTS).logits, expected), "the name opens the expert's anchors"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    (reloaded,) = loaded.base_model.lemoe_layers().values()
    assert torch.equal(reloaded.lemoe_subject_names["default"], layer.lemoe_subject_names["default"])
    with torch.no_grad():
        assert torch.equal(loaded(INPUTS).logits, expected)


def test_config_disagreeing_with_the_tensors_is_refused(saved):
    config_path = saved / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its adapter_config.json.*num_experts=3"):
        PeftModel.from_pretrained(tiny_model(), saved / "adapter")


def test_checkpoint_mismatch_is_refused_by_the_tuner_for_files_loaded_elsewhere(saved):
    """Hub downloads skip the folder check; the tuner checks the tensors it receives against the config."""
    config = LEMoEConfig.from_pretrained(saved / "adapter")
    config.num_anchors += 1
    model = get_peft_model(tiny_model(), config)
    state = load_file(saved / "adapter" / "adapter_model.safetensors")
    with pytest.raises((ValueError, RuntimeError), match="holds num_experts=2, num_anchors=54"):
        set_peft_model_state_dict(model, state)


def test_low_cpu_mem_usage_loading_is_exact(saved):
    model = PeftModel.from_pretrained(tiny_model(), saved / "adapter", low_cpu_mem_usage=True)
    expected = load_file(saved / "expected.safetensors")
    with torch.no_grad():
        assert torch.equal(model(expected["inputs"]).logits, expected["logits"])


def test_bfloat16_base_model_round_trip(tmp_path):
    model = get_peft_model(tiny_model().to(torch.bfloat16), LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS, scale=2.0)
    layer = next(iter(model.base_model.lemoe_layers().values()))
    assert layer.lemoe_A["default"].dtype == torch.float32, "PEFT keeps adapter weights in float32"
    assert layer.lemoe_keys["default"].dtype == torch.float32, "routing state stays in float32"
    assert layer.lemoe_route_projection["default"].dtype == torch.float32
    with torch.no_grad():
        edited = model(INPUTS).logits
        assert edited.dtype == torch.bfloat16
        with model.disable_adapter():
            assert not torch.equal(model(INPUTS).logits, edited)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(INPUTS).logits, edited)


def _with_log(saved):
    """The saved adapter with a real edit log (two batches of one request each)."""
    log = [{"expert": i, "requests": [{"prompt": f"p{i}", "target_new": "x", "fingerprint": f"f{i}"}]} for i in (0, 1)]
    config = LEMoEConfig.from_pretrained(saved / "adapter")
    config.edit_log = log
    config.save_pretrained(saved / "adapter")
    return log


@pytest.mark.parametrize(
    "load",
    [
        lambda folder: PeftConfig.from_pretrained(folder),
        lambda folder: LEMoEConfig.from_pretrained(folder),
        lambda folder: AutoPeftModelForCausalLM.from_pretrained(folder).peft_config["default"],
        lambda folder: PeftModel.from_pretrained(tiny_model(), folder).peft_config["default"],
        lambda folder: _loaded_as_second(folder).peft_config["second"],
    ],
    ids=["PeftConfig", "LEMoEConfig", "AutoPeftModel", "PeftModel", "load_adapter"],
)
def test_every_way_of_loading_keeps_the_edit_log_and_a_resave_keeps_it(saved, load, tmp_path):
    log = _with_log(saved)
    config = load(saved / "adapter")
    assert config.edit_log == log
    config.save_pretrained(tmp_path / "again")
    assert LEMoEConfig.from_pretrained(tmp_path / "again").edit_log == log


@pytest.mark.parametrize(
    "load",
    [
        lambda folder: LEMoEConfig.from_pretrained(folder),
        lambda folder: AutoPeftModelForCausalLM.from_pretrained(folder).peft_config["default"],
        lambda folder: PeftModel.from_pretrained(tiny_model(), folder).peft_config["default"],
        lambda folder: _loaded_as_second(folder).peft_config["second"],
    ],
    ids=["LEMoEConfig", "AutoPeftModel", "PeftModel", "load_adapter"],
)
def test_an_adapter_saved_before_the_subject_margin_generated_token_rule_and_restart_existed_routes_as_it_did(
    saved, load
):
    path = saved / "adapter" / "adapter_config.json"
    fields = json.loads(path.read_text())
    assert fields.pop("route_subject_margin") == 0.0
    assert fields.pop("route_generated_tokens") == "prompt_experts"
    assert fields.pop("route_restart") == "sentence"
    assert fields.pop("route_subject_tokens") == "pooled"
    fields.pop("route_subject_names"), fields.pop("route_vocab_size")
    path.write_text(json.dumps(fields))
    weights = saved / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.endswith("lemoe_token_marks")}, weights)
    config = load(saved / "adapter")
    assert config.route_subject_margin is None and config.route_generated_tokens == "any"
    assert config.route_subject_names == "off" and config.route_restart == "off" and config.route_vocab_size == 0
    assert config.route_subject_tokens == "pooled"


def _loaded_as_second(folder):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    model.load_adapter(folder, "second")
    return model


def test_a_state_dict_loads_into_a_fresh_adapter(saved):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    set_peft_model_state_dict(model, load_file(saved / "adapter" / "adapter_model.safetensors"))
    assert model.peft_config["default"].num_experts == 2
    expected = load_file(saved / "expected.safetensors")
    with torch.no_grad():
        assert torch.equal(model(expected["inputs"]).logits, expected["logits"])


def test_a_state_dict_that_does_not_fit_a_non_empty_adapter_names_the_counts_to_use(saved):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    give_expert(model, INPUTS)
    with pytest.raises(ValueError, match=f"num_experts=2, num_anchors={2 * INPUTS.numel()}"):
        set_peft_model_state_dict(model, load_file(saved / "adapter" / "adapter_model.safetensors"))


def test_two_adapters_made_from_one_config_object_stay_independent(tmp_path):
    config = LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4)
    model = get_peft_model(tiny_model(), config)
    model.add_adapter("second", config)  # the same object, as PEFT's own tests do
    give_expert(model, INPUTS)
    model.peft_config["default"].edit_log.append({"expert": 0, "requests": []})
    assert model.peft_config["second"].num_experts == 0 and model.peft_config["second"].edit_log == []
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "second")
    assert reloaded.peft_config["default"].num_experts == 0


def test_loading_a_second_adapter_leaves_the_first_alone(saved):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    give_expert(model, INPUTS)
    model.load_adapter(saved / "adapter", "second")
    assert model.peft_config["default"].num_experts == 1 and model.peft_config["second"].num_experts == 2
    empty = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4))
    empty.load_adapter(saved / "adapter", "second")
    assert empty.peft_config["default"].num_experts == 0, "an empty adapter is not sized from another's weights"
