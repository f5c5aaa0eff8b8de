"""The edit log: which requests each expert holds, when and how they were edited. It is the ``edit_log`` field of
``LEMoEConfig``, so it is saved in ``adapter_config.json`` and every PEFT loader keeps it; and atomic JSON writing."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from .requests import EditRequest

LEGACY_EDIT_LOG_NAME = "edit_log.json"
LEGACY_EDIT_LOG_FORMAT = "lemoe-edit-log/1"


def fingerprint(request: EditRequest) -> str:
    """A stable identity of a request (its content), used to skip requests that were already edited."""
    payload = json.dumps(request.to_dict(), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, flush it to disk, then rename it over ``path``. The file is
    created with mode 0666 so the kernel applies the umask (as ``open()`` does); the process umask is never touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1, ensure_ascii=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_edit_log(batches: Any, source: str) -> list[dict[str, Any]]:
    """``batches`` if it is an edit log (a list of batches, each with an expert index and fingerprinted requests)."""
    if not isinstance(batches, list):
        raise ValueError(f"{source} is not a LEMoE edit log (a list of edited batches).")
    for index, batch in enumerate(batches):
        if not (
            isinstance(batch, dict)
            and isinstance(batch.get("expert"), int)
            and isinstance(batch.get("requests"), list)
            and all(isinstance(r, dict) and isinstance(r.get("fingerprint"), str) for r in batch["requests"])
        ):
            raise ValueError(f"{source}: batch {index} needs an 'expert' index and 'requests' with fingerprints.")
    return batches


def parse_legacy_edit_log(text: str, source: str) -> list[dict[str, Any]]:
    """The batches of an ``edit_log.json`` file, where adapters saved before the log moved into the config kept it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != LEGACY_EDIT_LOG_FORMAT:
        raise ValueError(f"{source} is not a LEMoE edit log (expected format '{LEGACY_EDIT_LOG_FORMAT}').")
    return check_edit_log(data.get("batches"), source)


def edited_fingerprints(batches: list[dict[str, Any]]) -> set[str]:
    return {request["fingerprint"] for batch in batches for request in batch["requests"]}
