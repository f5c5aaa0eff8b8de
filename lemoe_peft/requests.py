"""``EditRequest``: one fact to edit, with the probes that measure the edit (EasyEdit's request vocabulary)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


class RequestError(ValueError):
    """A malformed edit request; the message names the record and the field."""


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer expected after it (a locality or portability check)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    """Edit ``prompt -> target_new``.

    ``rephrase_prompts`` test generality, ``locality`` probes must keep the unedited model's answers, and
    ``portability`` probes test consequences of the edit. Build one directly, or from an EasyEdit request dict with
    :meth:`from_dict` (``prompt``, ``target_new``, ``ground_truth``, ``subject``, ``rephrase_prompt``,
    ``locality``/``portability`` as ``{name: {"prompt": ..., "ground_truth": ...}}`` or KnowEdit's
    ``{name: [{"prompt": ..., "ground_truth": ...}]}``, or flat ``locality_prompt``/``locality_ground_truth``;
    WISE's temporal data names its rephrase ``ood_rephrase``).
    """

    prompt: str
    target_new: str
    ground_truth: str | None = None
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RequestError(f"field '{name}' must be a non-empty string, got {value!r}")
        for name in ("ground_truth", "subject", "case_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(f"field '{name}' must be a string or None, got {value!r}")
        object.__setattr__(self, "rephrase_prompts", tuple(self.rephrase_prompts))
        object.__setattr__(self, "locality", tuple(self.locality))
        object.__setattr__(self, "portability", tuple(self.portability))
        if not all(isinstance(p, str) and p.strip() for p in self.rephrase_prompts):
            raise RequestError("field 'rephrase_prompts' must hold non-empty strings")
        for name in ("locality", "portability"):
            for probe in getattr(self, name):
                if not isinstance(probe, Probe) or not all(
                    isinstance(t, str) and t.strip() for t in vars(probe).values()
                ):
                    raise RequestError(f"field '{name}' must hold probes with a non-empty prompt and answer")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EditRequest:
        """Build a request from an EasyEdit request dict (see the class docstring for the accepted keys)."""
        if not isinstance(record, Mapping):
            raise RequestError(f"a request must be a mapping, got {type(record).__name__}")
        if "prompt" not in record or "target_new" not in record:
            raise RequestError("a request needs the fields 'prompt' and 'target_new'")
        rephrases = record.get("rephrase_prompts", record.get("rephrase_prompt", record.get("ood_rephrase")))
        locality = list(_probes(record.get("locality"), "locality"))
        if record.get("locality_prompt") is not None:
            locality += _zip_probes(record["locality_prompt"], record.get("locality_ground_truth"), "locality")
        return cls(
            prompt=record["prompt"],
            target_new=_answer(record["target_new"], "target_new"),
            ground_truth=None
            if record.get("ground_truth") is None
            else _answer(record["ground_truth"], "ground_truth"),
            subject=record.get("subject"),
            rephrase_prompts=_strings(rephrases, "rephrase_prompt"),
            locality=tuple(locality),
            portability=tuple(_probes(record.get("portability"), "portability")),
            case_id=None if record.get("case_id") is None else str(record["case_id"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back into an equal request."""
        data = asdict(self)
        data["rephrase_prompts"] = list(self.rephrase_prompts)
        for name in ("locality", "portability"):
            data[name] = {
                "probes": {
                    "prompt": [p.prompt for p in getattr(self, name)],
                    "ground_truth": [p.answer for p in getattr(self, name)],
                }
            }
        return data


def _answer(value: Any, name: str) -> str:
    """An answer given as a string, EasyEdit's ``{"str": ...}``, or a list of aliases (the first is used)."""
    if isinstance(value, Mapping) and "str" in value:
        value = value["str"]
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"field '{name}' must be a non-empty string (or list of them), got {value!r}")
    return value


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
        raise RequestError(f"field '{name}' must be a non-empty string or a list of them, got {value!r}")
    return tuple(values)


def _zip_probes(prompts: Any, answers: Any, name: str) -> list[Probe]:
    prompts = _strings(prompts, f"{name}.prompt")
    if isinstance(answers, str) or (isinstance(answers, Mapping) and "str" in answers):
        answers = [answers]
    if not isinstance(answers, (list, tuple)) or len(answers) != len(prompts):
        raise RequestError(f"field '{name}' needs one ground_truth per prompt, got {answers!r}")
    return [Probe(p, _answer(a, f"{name}.ground_truth")) for p, a in zip(prompts, answers, strict=True)]


def _probes(value: Any, name: str) -> list[Probe]:
    """Probes from ``{key: {"prompt": p, "ground_truth": a}}`` or ``{key: [{"prompt": p, "ground_truth": a}, ...]}``."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise RequestError(f"field '{name}' must map probe names to prompts and answers, got {type(value).__name__}")
    probes: list[Probe] = []
    for key, entry in value.items():
        entries = entry if isinstance(entry, list) else [entry]
        for item in entries:
            if not isinstance(item, Mapping) or "prompt" not in item or "ground_truth" not in item:
                raise RequestError(f"field '{name}.{key}' needs 'prompt' and 'ground_truth'")
            probes += _zip_probes(item["prompt"], item["ground_truth"], f"{name}.{key}")
    return probes
