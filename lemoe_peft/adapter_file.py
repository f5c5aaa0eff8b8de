"""Checks an ``adapter_model.safetensors`` against its ``adapter_config.json`` before anything is loaded.

A truncated or foreign file, or a config whose ``num_experts``/``num_anchors`` disagree with the stored tensors, is
refused with a message that says what is wrong, instead of a partial load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

ADAPTER_WEIGHTS = "adapter_model.safetensors"

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
}

# the buffers that decide routing (anchor keys, their owners and thresholds, the query whitening)
ROUTING_STATE = (
    "lemoe_keys",
    "lemoe_key_expert",
    "lemoe_key_threshold",
    "lemoe_key_subject",
    "lemoe_subjects",
    "lemoe_subject_expert",
    "lemoe_route_mean",
    "lemoe_route_basis",
    "lemoe_route_scale",
)
# every LEMoE layer saves these, whatever the number of experts; the newest expert (lemoe_A/B) exists once one does
SAVED_BUFFERS = ("lemoe_frozen_A", "lemoe_frozen_B", *ROUTING_STATE)


def read_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking that the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated: it is too short to hold a safetensors header.")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header of {header_length} bytes).")
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is corrupt: its header is not valid JSON ({error}).") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its header is not a table of tensors.")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
        ):
            raise ValueError(f"{path} is corrupt: the entry of tensor {name!r} lacks a shape or data offsets.")
    end = max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if 8 + header_length + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, but its tensors need {8 + header_length + end}.")
    return tensors


def check_adapter_file(folder: str | Path, config: Any) -> None:
    """Refuse an adapter folder whose weights are damaged or do not match ``config``."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        return
    tensors = read_header(path)
    fields_by_layer: dict[str, set[str]] = {}
    for name in tensors:
        layer, _, field = name.rpartition(".")
        if field.startswith("lemoe_"):  # other tuners' tensors (a LoRA that LEMoE wraps) may share the file
            fields_by_layer.setdefault(layer, set()).add(field)
    expected = set(SAVED_BUFFERS) | ({"lemoe_A", "lemoe_B"} if config.num_experts > 0 else set())
    problems = [] if fields_by_layer else ["the file holds no LEMoE tensors"]
    for layer, fields in fields_by_layer.items():
        if fields != expected:
            missing, extra = sorted(expected - fields), sorted(fields - expected)
            problems.append(f"{layer} " + (f"lacks {missing}" if missing else f"has unexpected {extra}"))
    for name, info in tensors.items():
        field = name.rsplit(".", 1)[-1]
        rows = info["shape"][0] if info["shape"] else None
        if field in _RECORDED_SIZES and rows != _RECORDED_SIZES[field](config):
            problems.append(f"{name} has {rows} rows, expected {_RECORDED_SIZES[field](config)}")
    if problems:
        raise ValueError(
            f"{path} does not match its adapter_config.json (num_experts={config.num_experts}, "
            f"num_anchors={config.num_anchors}): {'; '.join(problems[:3])}. Nothing was loaded."
        )
