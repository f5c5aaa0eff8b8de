"""Test helpers: tiny random models of every supported architecture, and helpers that give a LEMoE adapter
experts whose anchors route real inputs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: tests never touch the network

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import lemoe_peft  # noqa: E402,F401  (registers the PEFT type)
from lemoe_peft.routing import SENTENCE_END, SPACE_BEFORE  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"

VOCAB = 128
_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2}
TINY_CONFIGS = {
    "llama": {**_COMMON, **_ATTENTION},
    "mistral": {**_COMMON, **_ATTENTION},
    "qwen2": {**_COMMON, **_ATTENTION},
    "qwen3": {**_COMMON, **_ATTENTION, "head_dim": 8},
    "gemma": {**_COMMON, **_ATTENTION, "head_dim": 8},
    "gemma2": {**_COMMON, **_ATTENTION, "head_dim": 8},
    "gemma3_text": {**_COMMON, **_ATTENTION, "head_dim": 8},
    "phi3": {**_COMMON, **_ATTENTION, "pad_token_id": 0},
    "olmo2": {**_COMMON, **_ATTENTION},
    "gpt2": {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 64},
    "gpt_neox": {**_COMMON, "num_attention_heads": 4},
    "opt": {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 64,
    },
}


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 4-layer causal LM of ``model_type`` (tens of thousands of parameters)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def token_batch(batch: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def give_expert(
    model,
    input_ids: torch.Tensor,
    adapter_name: str | None = None,
    scale: float = 0.5,
    subject_position: int | None = None,
    positions: slice = slice(None),
) -> int:
    """Calibrate routing (first time), add an expert with random non-zero weights, and anchor it to the
    ``positions`` (default: all) of ``input_ids``, so those inputs are routed to it; with ``subject_position``, every
    anchor is gated by the subject key taken at that position of the first sequence, named by its last three ids up
    to that position. Returns the expert index."""
    tuner = model.base_model
    name = adapter_name or tuner.active_adapters[0]
    layers = tuner.lemoe_layers(name)
    if model.peft_config[name].route_calibration_size == 0:
        with torch.no_grad(), tuner.capture_layer_inputs() as captured:
            model(input_ids=token_batch(16, 12, seed=99))
        samples = {key: layer.pooled_queries(name, *captured[key]).flatten(0, 1) for key, layer in layers.items()}
        tuner.calibrate_routing(samples, name)
    expert = tuner.add_expert(name)
    with torch.no_grad():
        for layer in layers.values():
            layer.lemoe_B[name].normal_(std=scale)
        with tuner.capture_layer_inputs() as captured:
            model(input_ids=input_ids)
    keys = {
        key: layer.route_queries(name, layer.pooled_queries(name, *captured[key]))[:, positions].flatten(0, 1)
        for key, layer in layers.items()
    }
    subjects = gate = names = None
    if subject_position is not None:
        at = slice(subject_position, subject_position + 1)
        subjects = {key: layer.subject_queries(name, captured[key][0][0, at]) for key, layer in layers.items()}
        gate = torch.zeros(next(iter(keys.values())).shape[0], dtype=torch.long)
        names = [input_ids[0, max(subject_position - 2, 0) : subject_position + 1].tolist()]
    tuner.add_anchors(expert, keys, adapter_name=name, subjects=subjects, key_subject=gate, subject_names=names)
    return expert


def sentence_marks(ends_every: int = 3) -> torch.Tensor:
    """Token marks for the tiny vocabulary: every token begins with whitespace and every ``ends_every``-th ends a
    sentence, so random token sequences hold several sentences."""
    marks = torch.full((VOCAB,), SPACE_BEFORE, dtype=torch.uint8)
    marks[::ends_every] |= SENTENCE_END
    return marks


WORDS = """
    paris rome berlin madrid london oslo vienna lisbon is in the capital of france italy germany spain norway
    austria portugal england europe asia who wrote hamlet faust shakespeare goethe tolstoy what colour sky blue
    green red a an city country river nile danube amazon flows through egypt brazil painted guernica picasso
    dali mona lisa leonardo grass ocean deep . ! alpha beta gamma zeta eta kappa lambda mu
""".split()
# a chat template in the tiny vocabulary: "tolstoy" opens a user's message, "leonardo" a reply, "[EOS]" ends a turn
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'tolstoy ' if m['role'] == 'user' else 'leonardo ' }}{{ m['content'] }} [EOS] "
    "{% endfor %}{% if add_generation_prompt %}leonardo {% endif %}"
)


def tiny_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` whose ids fit ``VOCAB`` (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(dict.fromkeys(WORDS))}}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


# facts and generic text in the tiny tokenizer's vocabulary (shared by the editor tests and benchmarks/gpu_check.py)
FACTS = [
    ("paris is in", "italy", "paris is the capital of"),
    ("rome is the capital of", "spain", "rome is in"),
    ("berlin is in", "asia", "berlin is the capital of"),
    ("who wrote hamlet", "goethe", "hamlet who wrote"),
    ("the nile flows through", "brazil", "the river nile flows through"),
    ("who painted guernica", "dali", "guernica who painted"),
    ("madrid is the capital of", "norway", "madrid is in"),
    ("oslo is in", "egypt", "oslo is the capital of"),
]
CALIBRATION = [  # generic text for the routing statistics: none of it is an edit prompt
    "the sky is blue",
    "the grass is green",
    "who painted the mona lisa",
    "vienna is in austria",
    "lisbon is the capital of portugal",
    "the danube flows through europe",
    "who wrote faust",
    "london is in england",
    "the amazon flows through brazil",
    "what colour is the ocean",
]
