"""``LEMoEConfig``: the architecture of a LEMoE adaptor, in PEFT's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft.config import PeftConfig

from .adapter_file import check_adapter_file
from .edit_log import LEGACY_EDIT_LOG_NAME, check_edit_log, parse_legacy_edit_log
from .hub import write_card
from .registration import LEMOE

# The FFN output projection of each supported architecture. LEMoE puts its experts beside this projection, so an
# expert sees the FFN's intermediate activation and adds to the FFN's output: h = FFN(x) + sum_i g_i * E_i(x).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["mlp.down_proj"],
    "mistral": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
    "qwen3": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"],
    "gemma2": ["mlp.down_proj"],
    "gemma3_text": ["mlp.down_proj"],
    "phi3": ["mlp.down_proj"],
    "olmo2": ["mlp.down_proj"],
    "gpt2": ["mlp.c_proj"],
    "gpt_neox": ["mlp.dense_4h_to_h"],
    "opt": ["fc2"],
}

# Config keys under which transformers configs store their number of decoder layers.
_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

ROUTE_POOLINGS = ("causal_mean", "token", "mean_and_token")
ROUTE_SIMILARITIES = ("cosine", "dot")
ROUTE_GENERATED_TOKENS = ("prompt_experts", "any")
ROUTE_SUBJECT_NAMES = ("off", "also", "only")
ROUTE_RESTARTS = ("sentence", "off")
ROUTE_SUBJECT_TOKENS = ("pooled", "left_out")
EXPERT_ACTIVATIONS = ("silu", "gelu", "relu", "identity")


def default_layer_index(model_config: dict, depth: float) -> int:
    """The index of the layer at relative ``depth`` (in (0, 1], 1 = last) of a transformers model config."""
    for key in _NUM_LAYERS_KEYS:
        if isinstance(model_config.get(key), int):
            num_layers = model_config[key]
            return min(num_layers - 1, int(depth * num_layers))
    raise ValueError(
        "Cannot tell how many layers this model has; pass `layers_to_transform` (and `target_modules`) to LEMoEConfig."
    )


@dataclass
class LEMoEConfig(PeftConfig):
    """Configuration of a LEMoE adaptor (Wang & Li, EMNLP 2024): a growing set of low-rank experts beside one FFN,
    each owning anchor keys that route inputs to it; inputs far from every anchor keep the base FFN's output.

    ``num_experts`` and ``num_anchors`` record how many experts and anchor keys the adaptor holds. They grow with
    :meth:`LEMoEModel.add_expert` / :meth:`LEMoEModel.add_anchors` and are saved, so a reload rebuilds the same shapes.
    ``edit_log`` holds one record per edited batch. Like the counts it is a config field, saved in
    ``adapter_config.json``, so every way PEFT loads a config (``PeftConfig.from_pretrained``, ``PeftModel``,
    ``AutoPeftModel``, ``load_adapter``) keeps the history, and an editor never re-edits facts the adapter holds.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to put experts beside (the FFN output projection). Default: chosen per model_type."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to leave alone even if they match `target_modules`."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Layer indices to adapt. Default (with default target_modules): one layer at `layer_depth`."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers' or 'h') if PEFT cannot guess it."}
    )
    layer_depth: float = field(
        default=0.8, metadata={"help": "Relative depth (0..1] of the default layer: 0.8 is layer 24 of 30."}
    )
    expert_rank: int = field(default=16, metadata={"help": "Hidden width r of each expert (in -> r -> out)."})
    expert_activation: Literal["silu", "gelu", "relu", "identity"] = field(
        default="silu", metadata={"help": "Non-linearity inside each expert; 'identity' makes experts LoRA-like."}
    )
    num_experts: int = field(default=0, metadata={"help": "Number of experts held (grows with add_expert)."})
    num_anchors: int = field(default=0, metadata={"help": "Number of anchor keys held (grows with add_anchors)."})
    num_subjects: int = field(default=0, metadata={"help": "Number of subject keys held (grows with add_anchors)."})
    top_k: int = field(default=1, metadata={"help": "Experts mixed per token among those whose anchors match."})
    route_pooling: Literal["causal_mean", "token", "mean_and_token"] = field(
        default="mean_and_token",
        metadata={
            "help": "Routing query: running mean of the layer input over the tokens so far, the token alone, or both "
            "(each whitened and normalized on its own, half of route_key_dim each, mixed by route_token_weight)."
        },
    )
    route_token_weight: float = field(
        default=0.5,
        metadata={"help": "With route_pooling='mean_and_token': weight w of the token, score = (1-w) mean + w token."},
    )
    route_restart: Literal["sentence", "off"] = field(
        default="sentence",
        metadata={
            "help": "Where the running mean of the routing query starts again: at each new sentence (after a token "
            "ending in '.' or '!' and whitespace), so a question is pooled over its own sentence, or 'off': over "
            "everything read (adapters saved before this setting existed load with 'off'). Sentences are found by "
            "the token marks the adapter holds (LEMoEModel.set_token_marks); calls that pass embeddings never restart."
        },
    )
    route_subject_tokens: Literal["pooled", "left_out"] = field(
        default="pooled",
        metadata={
            "help": "Whether the tokens of an edited subject's name count in the routing query's running mean, or "
            "leave it from the name's last token on ('left_out'): the subject gate says about whom a text asks, the "
            "query then tells only what is asked. Needs names read (route_subject_names 'only' or 'also')."
        },
    )
    route_vocab_size: int = field(
        default=0, metadata={"help": "Token ids the adapter holds marks for (set with set_token_marks; 0: none)."}
    )
    route_chat_opening: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Ids the chat template writes before a user's message; the routing query's running mean starts "
            "again after them, so a system message or earlier turns do not count (set with set_chat_markers)."
        },
    )
    route_chat_reply: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Ids the chat template writes between a user's message and the assistant's reply: routed with the "
            "message's query and left out of the running mean, so the reply is routed as the message is."
        },
    )
    route_similarity: Literal["cosine", "dot"] = field(
        default="cosine", metadata={"help": "Score between a query and an anchor key."}
    )
    route_whiten_rank: int = field(
        default=64, metadata={"help": "Principal directions whitened by the routing calibration (0: centring only)."}
    )
    route_key_dim: int = field(
        default=256,
        metadata={
            "help": "Width k of the space where routing queries meet anchor and subject keys: the whitened principal "
            "directions plus a fixed random reduction of the rest (0: the layer's full input width)."
        },
    )
    route_threshold: float = field(
        default=0.5,
        metadata={"help": "Default score an input needs to reach an anchor; below it the FFN is untouched."},
    )
    route_subject_threshold: float | None = field(
        default=0.65,
        metadata={
            "help": "Cosine a token of the input must reach with an edit's subject key before that edit's anchors "
            "serve it (None: no subject gate)."
        },
    )
    route_subject_margin: float | None = field(
        default=0.0,
        metadata={
            "help": "A token reads only the edited subjects it matches within this margin of its best-matching "
            "subject key (None: every subject above route_subject_threshold; adapters saved before this setting "
            "existed load with None and route as they did)."
        },
    )
    route_subject_names: Literal["off", "also", "only"] = field(
        default="only",
        metadata={
            "help": "Whether a token also reads an edited subject by its name: the subject's tokens, as the edits "
            "wrote it, ending at that token ('also': by name or by key; 'only': by name alone; 'off': by key alone, "
            "as adapters saved before this setting existed load). Calls that pass embeddings, not ids, read keys."
        },
    )
    route_subject_name_tokens: int = field(
        default=8, metadata={"help": "Tokens kept of each subject's name (its last ones, if longer)."}
    )
    route_generated_tokens: Literal["prompt_experts", "any"] = field(
        default="prompt_experts",
        metadata={
            "help": "During cached generation, a generated token (a one-token call continuing a KV cache) routes "
            "only to the experts the prompt's last token routed to ('prompt_experts'), or wherever its own query "
            "leads ('any': adapters saved before this setting existed load with it and generate as they did)."
        },
    )
    route_temperature: float = field(default=0.1, metadata={"help": "Softmax temperature mixing the top_k experts."})
    route_calibration_size: int = field(
        default=0, metadata={"help": "Number of query vectors the routing statistics came from (0: not calibrated)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start each expert at zero output. False gives random experts (for tests)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save, as in other PEFT methods."}
    )
    edit_log: list[dict[str, Any]] = field(
        default_factory=list,
        repr=False,
        metadata={"help": "One record per edited batch: its expert, settings and requests (grows with editing)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LEMOE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()
        check_edit_log(self.edit_log, "LEMoEConfig.edit_log")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        write_card(save_directory, self)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> LEMoEConfig:
        """``PeftConfig.from_pretrained``, and for a local folder: check its weights against the config first."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if folder.is_dir():
            check_adapter_file(folder, config)
            legacy = folder / LEGACY_EDIT_LOG_NAME
            if not config.edit_log and legacy.is_file():
                config.edit_log = parse_legacy_edit_log(legacy.read_text(encoding="utf-8"), str(legacy))
        return config

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT calls this with a saved config's fields before building it: one saved before
        ``route_subject_margin``, ``route_generated_tokens``, ``route_subject_names`` or ``route_restart`` existed keeps
        the routing it was trained with."""
        kwargs.setdefault("route_subject_margin", None)
        kwargs.setdefault("route_generated_tokens", "any")
        kwargs.setdefault("route_subject_names", "off")
        kwargs.setdefault("route_restart", "off")
        return super().check_kwargs(**kwargs)

    def _validate(self) -> None:
        checks = [
            (isinstance(self.expert_rank, int) and self.expert_rank >= 1, "expert_rank must be an integer >= 1"),
            (isinstance(self.num_experts, int) and self.num_experts >= 0, "num_experts must be an integer >= 0"),
            (isinstance(self.num_anchors, int) and self.num_anchors >= 0, "num_anchors must be an integer >= 0"),
            (isinstance(self.num_subjects, int) and self.num_subjects >= 0, "num_subjects must be an integer >= 0"),
            (
                self.route_subject_threshold is None or -1.0 <= self.route_subject_threshold <= 1.0,
                "route_subject_threshold is a cosine similarity and must lie in [-1, 1] (or be None)",
            ),
            (isinstance(self.top_k, int) and self.top_k >= 1, "top_k must be an integer >= 1"),
            (0.0 < self.layer_depth <= 1.0, "layer_depth must lie in (0, 1]"),
            (
                self.route_subject_margin is None or self.route_subject_margin >= 0,
                "route_subject_margin must be >= 0 (or None)",
            ),
            (self.route_pooling in ROUTE_POOLINGS, f"route_pooling must be one of {ROUTE_POOLINGS}"),
            (
                self.route_generated_tokens in ROUTE_GENERATED_TOKENS,
                f"route_generated_tokens must be one of {ROUTE_GENERATED_TOKENS}",
            ),
            (
                self.route_subject_names in ROUTE_SUBJECT_NAMES,
                f"route_subject_names must be one of {ROUTE_SUBJECT_NAMES}",
            ),
            (
                isinstance(self.route_subject_name_tokens, int) and self.route_subject_name_tokens >= 1,
                "route_subject_name_tokens must be an integer >= 1",
            ),
            (self.route_restart in ROUTE_RESTARTS, f"route_restart must be one of {ROUTE_RESTARTS}"),
            (
                self.route_subject_tokens in ROUTE_SUBJECT_TOKENS,
                f"route_subject_tokens must be one of {ROUTE_SUBJECT_TOKENS}",
            ),
            (
                isinstance(self.route_vocab_size, int) and self.route_vocab_size >= 0,
                "route_vocab_size must be an integer >= 0",
            ),
            (
                all(isinstance(i, int) and i >= 0 for i in [*self.route_chat_opening, *self.route_chat_reply]),
                "route_chat_opening and route_chat_reply must be lists of token ids",
            ),
            (0.0 < self.route_token_weight < 1.0, "route_token_weight must lie in (0, 1)"),
            (self.route_similarity in ROUTE_SIMILARITIES, f"route_similarity must be one of {ROUTE_SIMILARITIES}"),
            (self.expert_activation in EXPERT_ACTIVATIONS, f"expert_activation must be one of {EXPERT_ACTIVATIONS}"),
            (isinstance(self.route_whiten_rank, int) and self.route_whiten_rank >= 0, "route_whiten_rank must be >= 0"),
            (isinstance(self.route_key_dim, int) and self.route_key_dim >= 0, "route_key_dim must be an integer >= 0"),
            (self.route_temperature > 0, "route_temperature must be > 0"),
            (self.route_calibration_size >= 0, "route_calibration_size must be >= 0"),
            (
                self.route_similarity != "cosine" or -1.0 <= self.route_threshold <= 1.0,
                "route_threshold is a cosine similarity and must lie in [-1, 1]",
            ),
            (self.num_anchors == 0 or self.num_experts > 0, "anchors need at least one expert (num_experts > 0)"),
            (
                self.layers_pattern is None or self.layers_to_transform is not None,
                "layers_pattern only makes sense together with layers_to_transform",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid LEMoEConfig: {message}.")
