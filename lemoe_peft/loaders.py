"""``load_edit_requests``: edit requests from the field's data formats, detected or named.

Formats (``format=``), each detected from the fields of the first record:

- ``zsre``: ``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans`` (MEND / WISE ZsRE);
- ``knowedit``: ``prompt``, ``target_new``, ``locality``/``portability`` as lists per kind (KnowEdit);
- ``easyedit``: ``prompt``, ``target_new``, ``locality_prompt``, ``locality_ground_truth`` (EasyEdit/WISE
  CounterFact, temporal, hallucination), and EasyEdit request dicts;
- ``rome``: ``requested_rewrite`` with the ``{}`` subject placeholder (ROME CounterFact);
- ``wikibio``: ``text``, ``labels``, ``concept`` (KnowEdit WikiBio).

Sources: a ``.json`` file holding a list, a ``.jsonl`` file, a ``datasets.Dataset``, or any iterable of dicts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .requests import EditRequest, Probe, RequestError

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]


def _require(record: Record, *fields: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise RequestError(f"missing field '{missing[0]}'")


def _zsre(record: Record) -> EditRequest:
    _require(record, "src", "alt")
    answers = record.get("answers") or ([record["pred"]] if record.get("pred") else [])
    locality = (Probe(record["loc"], record["loc_ans"]),) if record.get("loc") and record.get("loc_ans") else ()
    return EditRequest(
        prompt=record["src"],
        target_new=record["alt"],
        ground_truth=answers[0] if answers else None,
        subject=record.get("subject"),
        rephrase_prompts=(record["rephrase"],) if record.get("rephrase") else (),
        locality=locality,
        case_id=None if record.get("case_id") is None else str(record["case_id"]),
    )


def _rome(record: Record) -> EditRequest:
    _require(record, "requested_rewrite")
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, Mapping):
        raise RequestError("field 'requested_rewrite' must be a mapping")
    _require(rewrite, "prompt", "subject", "target_new")
    if "{}" not in rewrite["prompt"]:
        raise RequestError("field 'requested_rewrite.prompt' needs the '{}' subject placeholder")
    truth = rewrite.get("target_true", {}).get("str") if isinstance(rewrite.get("target_true"), Mapping) else None
    neighbours = record.get("neighborhood_prompts") or []
    return EditRequest.from_dict(
        {
            "prompt": rewrite["prompt"].format(rewrite["subject"]),
            "target_new": rewrite["target_new"],
            "ground_truth": truth,
            "subject": rewrite["subject"],
            "rephrase_prompt": record.get("paraphrase_prompts") or None,
            "locality": {"neighborhood": {"prompt": neighbours, "ground_truth": [truth] * len(neighbours)}}
            if neighbours and truth
            else None,
            "case_id": record.get("case_id"),
        }
    )


def _wikibio(record: Record) -> EditRequest:
    _require(record, "text", "labels")
    return EditRequest.from_dict(
        {"prompt": record["text"], "target_new": record["labels"], "locality": record.get("locality")}
    )


FORMATS: dict[str, Callable[[Record], EditRequest]] = {
    "zsre": _zsre,
    "knowedit": EditRequest.from_dict,
    "easyedit": EditRequest.from_dict,
    "rome": _rome,
    "wikibio": _wikibio,
}


def detect_format(record: Record) -> str:
    """Name the format of a record from its fields."""
    if not isinstance(record, Mapping):
        raise RequestError(f"records must be JSON objects, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return "rome"
    if "src" in record and "alt" in record:
        return "zsre"
    if "text" in record and "labels" in record:
        return "wikibio"
    if "prompt" in record and "target_new" in record:
        locality = record.get("locality")
        if isinstance(locality, Mapping) and any(isinstance(v, list) for v in locality.values()):
            return "knowedit"
        return "easyedit"
    raise RequestError(f"unknown record format (fields: {sorted(record)[:8]}); pass format= one of {sorted(FORMATS)}")


def _read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise RequestError(f"{path} line {number}: not valid JSON ({error.msg})") from error
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RequestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_edit_requests(
    source: str | os.PathLike | Iterable[Record],
    format: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Read edit requests from ``source``, detecting the format from the first record unless ``format`` is given.

    A malformed record raises :class:`RequestError` naming the record (its index) and the field; with
    ``skip_invalid`` it is logged and left out instead (real data sets have a few, e.g. empty targets). ``limit``
    counts the requests returned.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; known formats: {sorted(FORMATS)}.")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"No edit data at {path}.")
        records, name = _read_records(path), str(path)
    else:
        records, name = list(source), type(source).__name__
    if not records:
        return []
    try:
        chosen = format or detect_format(records[0])
    except RequestError as error:
        raise RequestError(f"{name} record 0: {error}") from error
    convert = FORMATS[chosen]
    requests: list[EditRequest] = []
    for index, record in enumerate(records):
        if limit is not None and len(requests) >= limit:
            break
        try:
            if not isinstance(record, Mapping):
                raise RequestError(f"records must be JSON objects, got {type(record).__name__}")
            requests.append(convert(record))
        except RequestError as error:
            message = f"{name} record {index} ({chosen} format): {error}"
            if not skip_invalid:
                raise RequestError(message) from error
            logger.warning("Skipped %s", message)
    return requests
