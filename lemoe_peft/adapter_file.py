"""Checks an ``adapter_model.safetensors`` against its ``adapter_config.json`` before anything is loaded.

A truncated or foreign file, or a config whose ``num_experts``/``num_anchors`` disagree with the stored tensors, is
refused with a message that says what is wrong, instead of a partial load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

ADAPTER_WEIGHTS = "adapter_model.safetensors"

# what safetensors says when a file ends before its header or its tensors do
_TRUNCATION_SIGNS = ("incomplete metadata", "header too small", "invalid header length")
# tensor name -> the leading size the config records for it
_RECORDED_SIZES = {
    "lemoe_frozen_A": lambda c: max(c.num_experts - 1, 0),
    "lemoe_frozen_B": lambda c: max(c.num_experts - 1, 0),
    "lemoe_keys": lambda c: c.num_anchors,
    "lemoe_key_expert": lambda c: c.num_anchors,
    "lemoe_key_threshold": lambda c: c.num_anchors,
    "lemoe_key_subject": lambda c: c.num_anchors,
    "lemoe_subjects": lambda c: c.num_subjects,
    "lemoe_subject_expert": lambda c: c.num_subjects,
    "lemoe_subject_alias": lambda c: c.num_subjects,
    "lemoe_subject_names": lambda c: c.num_subjects,
    "lemoe_token_marks": lambda c: c.route_vocab_size,
}

# the buffers that decide routing (anchor keys, their owners and thresholds, the query whitening, the token marks)
ROUTING_STATE = (
    "lemoe_keys",
    "lemoe_key_expert",
    "lemoe_key_threshold",
    "lemoe_key_subject",
    "lemoe_subjects",
    "lemoe_subject_expert",
    "lemoe_subject_alias",
    "lemoe_subject_names",
    "lemoe_route_mean",
    "lemoe_route_projection",
    "lemoe_token_marks",
)
# tensors only adapters of earlier releases hold
_EARLIER_FORMAT = ("lemoe_route_basis", "lemoe_route_scale")
# tensors adapters of earlier releases lack, loaded with their defaults (every subject key its own subject, no names,
# no token marks)
ADDED_LATER = frozenset({"lemoe_subject_alias", "lemoe_subject_names", "lemoe_token_marks"})
# every LEMoE layer saves these, whatever the number of experts; the newest expert (lemoe_A/B) exists once one does
SAVED_BUFFERS = ("lemoe_frozen_A", "lemoe_frozen_B", *ROUTING_STATE)


def read_shapes(path: Path) -> dict[str, list[int]]:
    """The shape of every tensor in a safetensors file (read from its header, no data loaded); a truncated or corrupt
    file is refused with a ValueError saying which."""
    try:
        with safe_open(path, framework="pt") as file:
            return {name: file.get_slice(name).get_shape() for name in file.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        problem = "truncated" if any(sign in str(error) for sign in _TRUNCATION_SIGNS) else "corrupt"
        raise ValueError(f"{path} is {problem}: {error}.") from error


def check_adapter_file(folder: str | Path, config: Any) -> None:
    """Refuse an adapter folder whose weights are damaged or do not match ``config``."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        return
    shapes = read_shapes(path)
    fields_by_layer: dict[str, set[str]] = {}
    for name in shapes:
        layer, _, field = name.rpartition(".")
        if field.startswith("lemoe_"):  # other tuners' tensors (a LoRA that LEMoE wraps) may share the file
            fields_by_layer.setdefault(layer, set()).add(field)
    expected = set(SAVED_BUFFERS) | ({"lemoe_A", "lemoe_B"} if config.num_experts > 0 else set())
    problems = [] if fields_by_layer else ["the file holds no LEMoE tensors"]
    for layer, fields in fields_by_layer.items():
        if fields != expected and fields | ADDED_LATER != expected:
            missing, extra = sorted(expected - fields), sorted(fields - expected)
            problems.append(f"{layer} " + (f"lacks {missing}" if missing else f"has unexpected {extra}"))
    for name, shape in shapes.items():
        field = name.rsplit(".", 1)[-1]
        rows = shape[0] if shape else None
        if field in _RECORDED_SIZES and rows != _RECORDED_SIZES[field](config):
            problems.append(f"{name} has {rows} rows, expected {_RECORDED_SIZES[field](config)}")
    if any(fields & set(_EARLIER_FORMAT) for fields in fields_by_layer.values()):
        raise ValueError(
            f"{path} was written by an earlier lemoe-peft (routing whitening as {sorted(_EARLIER_FORMAT)}, before "
            "keys moved to the reduced routing space and subject keys were added); this version cannot route with "
            "it. Load it with lemoe-peft 0.x from before these changes, or edit the facts again. Nothing was loaded."
        )
    if problems:
        raise ValueError(
            f"{path} does not match its adapter_config.json (num_experts={config.num_experts}, "
            f"num_anchors={config.num_anchors}): {'; '.join(problems[:3])}. Nothing was loaded."
        )
