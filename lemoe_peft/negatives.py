"""Prompts an edit must *not* change, built at edit time from the requests themselves (never from evaluation data).

An expert's anchors can catch prompts near the edit that ask something else: the same subject with another relation
("The occupation of Toko Yasuda is"), or the edit's own wording about another subject. The editor trains each new
expert to leave the unedited model's predictions alone on those prompts and on the first tokens the unedited model
continues them with, wherever the new expert's anchors reach them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .requests import EditRequest

# Relation templates written for this package: common questions about an entity, filled with an edit's subject.
RELATION_TEMPLATES = (
    "{} was born in",
    "The nationality of {} is",
    "{} is located in",
    "{} works for",
    "The occupation of {} is",
    "{} was founded in",
    "{} is a member of",
    "The official language of {} is",
    "{} died in",
    "Who founded {}?",
    "What is {} known for?",
    "When was {} created?",
    "{} is part of",
    "The headquarters of {} are in",
    "Which country is {} from?",
    "{} is best known for",
)


def subject_span(request: EditRequest) -> tuple[int, int] | None:
    """Character span of the request's subject in its prompt (case-insensitive), or None."""
    if not request.subject:
        return None
    start = request.prompt.lower().find(request.subject.lower())
    return None if start < 0 else (start, start + len(request.subject))


def negative_prompts(requests: Sequence[EditRequest], per_request: int, seed: int) -> list[str]:
    """Up to ``per_request`` prompts per request with a subject: its subject in relation templates, and its prompt
    with the subject of another request of the batch (deterministic for ``seed``)."""
    rng = random.Random(seed)
    subjects = [r.subject for r in requests if subject_span(r) is not None]
    prompts = []
    for request in requests:
        span = subject_span(request)
        if span is None or per_request <= 0:
            continue
        others = [s for s in subjects if s.lower() != request.subject.lower()]
        swapped = [request.prompt[: span[0]] + rng.choice(others) + request.prompt[span[1] :]] if others else []
        templates = [t.format(request.subject) for t in rng.sample(RELATION_TEMPLATES, per_request)]
        prompts += (swapped + templates)[:per_request]
    return prompts
