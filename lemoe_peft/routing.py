"""KV anchor routing: routing queries, their calibration, expert selection, and the state that keeps routing
identical whether a sequence is scored in one forward pass or generated token by token with a KV cache.

The routing query of token t is the running mean of the adaptor layer's input over the tokens of its sentence so far
("causal_mean", an instance-level embedding of what is being asked) or the input at t alone ("token"). With
``route_restart="sentence"`` the mean restarts where a sentence begins (:func:`sentence_starts`: after a token ending
in "." or "!" and whitespace, as the adapter's :func:`token_marks` tell), so a question after other sentences is
pooled as it would be on its own. With a chat template's markers (:func:`chat_markers`) it also restarts where a
user's message begins, and the template's tokens between the message and the reply are *held*: left out of the mean
and routed with the message's own query (:func:`chat_turns`), so a question asked through the template is routed as
the question alone. With ``route_subject_tokens="left_out"`` the tokens of an edited subject's name leave the mean
from the name's last token on (:func:`left_out_subjects`): the gate below already says about whom a text asks, and
the query then tells only what is asked. An anchor made from an edit
whose subject is known also has a *subject gate*: it only serves a token once the subject has been read, that is once
some earlier token's input matched one of the subject's keys (:func:`subject_presence`). The query tells which
relation and wording are asked about; the gate tells about whom, so a prompt with the same template but another
subject does not reach the expert. Both depend only on the prefix, so teacher-forced training, teacher-forced
evaluation and cached generation route the same prefix the same way. During cached generation each call only sees
the new tokens, so the running state of earlier calls is kept per KV-cache object (:class:`RoutingSession`) and
resumed on the next call.

One rule applies to generation alone (``route_generated_tokens="prompt_experts"``): a token the model generates (a
one-token call that continues a cache) routes only to the experts the prompt's last token routed to
(:func:`keep_experts`). The prompt decides whether an edit answers; a prompt that reaches no expert is continued by
the base FFN, even where its continuation (a full stop, a newline) resembles an edit prompt's last token.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .teacher_forcing import common_prefix, has_chat_template

logger = logging.getLogger(__name__)

RunningSums = tuple[torch.Tensor, torch.Tensor]  # (sum over valid tokens (B, d), number of valid tokens (B, 1))
RecentInputs = tuple[torch.Tensor, torch.Tensor]  # the last inputs read (B, K, d) and their weights in the mean (B, K)


@dataclass
class RouteState:
    """What a LEMoE layer carries from one call to the next during cached generation."""

    tokens: torch.Tensor  # (B, 1) valid tokens read so far
    sums: dict[str, RunningSums] = field(default_factory=dict)  # per adapter: sums since the sentence began
    marks: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: the last token's marks (B,)
    presence: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: best subject scores so far (B, S)
    prompt_experts: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: prompt-end routes (B, k)
    recent_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: the last ids read (B, L - 1)
    turn_ids: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: the last ids read for chat markers
    queries: dict[str, torch.Tensor] = field(default_factory=dict)  # per adapter: the last query not held (B, D)
    subject_inputs: dict[str, RecentInputs] = field(default_factory=dict)  # per adapter: see left_out_subjects


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # float64 makes the running sums of a one-pass forward and of token-by-token generation agree to ~1e-16, so a
    # threshold decision cannot flip between the two; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def causal_mean(
    x: torch.Tensor,
    valid: torch.Tensor | None = None,
    prefix: RunningSums | None = None,
    starts: torch.Tensor | None = None,
    removed: RunningSums | None = None,
) -> tuple[torch.Tensor, RunningSums]:
    """Running mean of ``x`` (B, T, d) over the valid tokens up to each position, continuing from ``prefix``; where
    ``starts`` (B, T) is true the mean starts again from that token (earlier tokens and the prefix no longer count).
    ``removed`` (B, T, d) and (B, T): sums of inputs already counted that leave the mean at each token on
    (:func:`left_out_subjects`).

    Returns the means (B, T, d) in float32 and the running sums after the last position.
    """
    dtype = _accumulation_dtype(x.device)
    weight = torch.ones(x.shape[:2], device=x.device, dtype=dtype) if valid is None else valid.to(dtype)
    added = x.to(dtype) * weight[..., None]
    if removed is not None:
        added, weight = added - removed[0].to(dtype), weight - removed[1].to(dtype)
    sums = added.cumsum(dim=1)
    counts = weight.cumsum(dim=1)[..., None]
    continued: torch.Tensor | float = 1.0  # where the prefix still counts
    if starts is not None:
        position = torch.arange(x.shape[1], device=x.device).expand_as(starts)
        begin = torch.where(starts, position, -1).cummax(dim=1).values[..., None]  # the last start so far (-1: none)
        before = begin.clamp_min(0)
        sums = sums - F.pad(sums, (0, 0, 1, 0))[:, :-1].gather(1, before.expand_as(sums))
        counts = counts - F.pad(counts, (0, 0, 1, 0))[:, :-1].gather(1, before)
        continued = (begin < 0).to(dtype)
    if prefix is not None:
        sums = sums + prefix[0][:, None] * continued
        counts = counts + prefix[1][:, None] * continued
    means = (sums / counts.clamp_min(1)).to(torch.float32)
    return means, (sums[:, -1], counts[:, -1])


def left_out_subjects(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    named: torch.Tensor,
    lengths: torch.Tensor,
    starts: torch.Tensor | None = None,
    recent: RecentInputs | None = None,
) -> tuple[RunningSums, RecentInputs]:
    """What leaves the running mean at each token of a call when subject names are left out (``removed`` of
    :func:`causal_mean`): where a name ends (``named`` (B, T, S), :func:`named_subjects`; ``lengths`` (S,) its ids),
    its tokens, each once and only while still in the mean (counted with ``weight`` (B, T), after the last of
    ``starts``). A name may begin in an earlier call: ``recent`` are that call's last K inputs and their weights still
    in the mean, K + 1 the longest name. Returns the sums and counts that leave at each token, and the state to
    continue from."""
    batch, length = x.shape[:2]
    longest = max(1, int(lengths.max()) if lengths.numel() else 1)
    dtype = _accumulation_dtype(x.device)
    weight = torch.ones(batch, length, dtype=dtype, device=x.device) if weight is None else weight.to(dtype)
    if recent is None:
        recent = (x.new_zeros(batch, longest - 1, x.shape[-1]), weight.new_zeros(batch, longest - 1))
    inputs = torch.cat([recent[0].to(x), x], dim=1)  # the K tokens carried, then the call's
    weights = torch.cat([recent[1].to(dtype), weight], dim=1)
    token = torch.arange(-recent[0].shape[1], length, device=x.device)  # positions in the call (carried: < 0)
    ending = (named.long() * lengths.to(named.device)).amax(dim=-1).to(x.device)  # (B, T): longest name ending there
    never = length
    leaves = torch.full((batch, token.shape[0]), never, dtype=torch.long, device=x.device)
    for back in range(longest):  # the first name that ends ``back`` tokens after a token and holds it
        end = token + back
        inside = (end >= 0) & (end < length)
        holds = torch.zeros_like(leaves, dtype=torch.bool)
        holds[:, inside] = ending[:, end[inside]] > back
        leaves = torch.where(holds & (leaves == never), end.expand_as(leaves), leaves)
    begin = torch.full((batch, length), -token.shape[0], dtype=torch.long, device=x.device)  # no start yet
    if starts is not None:
        begin = torch.where(starts.to(x.device), token[-length:], begin).cummax(dim=1).values
    at = leaves.clamp(max=length - 1)
    left = (leaves < never) & (token >= begin.gather(1, at))  # a start after the token has dropped it already
    share = weights * left.to(dtype)
    removed = torch.zeros(batch, length, x.shape[-1], dtype=dtype, device=x.device)
    removed.scatter_add_(1, at[..., None].expand(-1, -1, x.shape[-1]), inputs.to(dtype) * share[..., None])
    counts = torch.zeros(batch, length, dtype=dtype, device=x.device).scatter_add_(1, at, share)
    still = weights * (~left & (token >= begin[:, -1:])).to(dtype)  # in the mean after the call
    kept = recent[0].shape[1]
    return (removed, counts), (inputs[:, inputs.shape[1] - kept :], still[:, still.shape[1] - kept :])


# bits of a token's marks (:func:`token_marks`)
SENTENCE_END, SPACE_BEFORE, SPACE_AFTER = 1, 2, 4


def token_marks(tokenizer: Any) -> torch.Tensor:
    """Marks (V,) uint8 of every token id of ``tokenizer``: whether its text ends a sentence (ends in "." or "!",
    trailing whitespace aside), starts with whitespace, or ends with whitespace. Special tokens have none.

    A token's text is read after an ordinary word, so tokenizers that drop a leading space at the start of a text
    (SentencePiece) still show it.
    """
    lead = tokenizer("a", add_special_tokens=False).input_ids[-1:]
    shown = len(tokenizer.decode(lead))
    size = len(tokenizer)
    texts = [text[shown:] for text in tokenizer.batch_decode([lead + [i] for i in range(size)])]
    marks = torch.tensor(
        [
            SENTENCE_END * text.rstrip().endswith((".", "!"))
            + SPACE_BEFORE * text[:1].isspace()
            + SPACE_AFTER * text[-1:].isspace()
            for text in texts
        ],
        dtype=torch.uint8,
    )
    marks[list(tokenizer.all_special_ids)] = 0
    return marks


def sentence_starts(
    ids: torch.Tensor, marks: torch.Tensor, valid: torch.Tensor | None = None, previous: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a new sentence begins in ``ids`` (B, T), by the token ``marks`` (V,): the token before ends a sentence
    and whitespace separates the two. ``previous`` (B,) are the marks of the token read before ``ids`` (cached
    generation). Returns the starts (B, T) and the marks of each row's last token (B,), to continue from."""
    known = (ids >= 0) & (ids < marks.shape[0])
    read = torch.where(known, marks[ids.clamp(0, marks.shape[0] - 1)], 0)
    if valid is not None:
        read = read.masked_fill(~valid, 0)  # padding neither ends nor begins a sentence
    first = read.new_zeros(ids.shape[0], 1) if previous is None else previous.to(read)[:, None]
    before = torch.cat([first, read[:, :-1]], dim=1)
    spaced = ((read & SPACE_BEFORE) | (before & SPACE_AFTER)) > 0
    starts = ((before & SENTENCE_END) > 0) & spaced
    return starts if valid is None else starts & valid, read[:, -1]


def chat_markers(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer``'s chat template writes around a user's message: those that open it (after a system
    message or an earlier reply: the routing query starts again after them) and those between the message's end and
    the assistant's reply (they keep the message's query). Read from two conversations that differ only in the
    message; ([], []) for a tokenizer without a chat template."""
    if not has_chat_template(tokenizer):
        return [], []

    def ids(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    def around(history: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """The ids before and after the last user message, whatever it says."""
        one, two = (ids([*history, {"role": "user", "content": text}]) for text in ("alpha beta gamma", "zeta eta"))
        before = common_prefix(one, two)
        after = common_prefix(one[before:][::-1], two[before:][::-1])
        return one[:before], one[len(one) - after :]

    from jinja2 import TemplateError

    try:
        first, reply = around([])
        later, _ = around([{"role": "user", "content": "kappa"}, {"role": "assistant", "content": "lambda mu"}])
    except (TemplateError, ValueError, TypeError) as error:
        logger.warning(
            "The tokenizer's chat template could not be read (%s): questions asked through it route as plain text.",
            error,
        )
        return [], []
    opening = first[len(first) - common_prefix(first[::-1], later[::-1]) :]
    return opening, reply


def chat_turn_table(opening: Sequence[int], reply: Sequence[int]) -> torch.Tensor:
    """The id sequences :func:`chat_turns` looks for (:func:`chat_markers`), right-aligned after -1s: row 0 the
    opening of a user's message, then every leading part of what comes between a message and the reply."""
    rows = [list(opening)] + [list(reply[: i + 1]) for i in range(len(reply))]
    width = max(1, *map(len, rows))
    return torch.tensor([[-1] * (width - len(row)) + row for row in rows], dtype=torch.long)


def chat_turns(
    ids: torch.Tensor, table: torch.Tensor, valid: torch.Tensor | None = None, recent: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a user's message begins in ``ids`` (B, T) (the token after its opening) and which tokens the chat
    template writes between a message and the reply ("held": routed with the message's query, left out of the
    running mean), by :func:`chat_turn_table`'s ``table`` (S, L). ``recent`` (B, L) are the ids read before ``ids``
    (cached generation). Returns the starts and held tokens (B, T) and the last L ids read, to continue from."""
    windows, recent = _id_windows(ids.to(table.device), table.shape[1], valid, recent, earlier=1)
    found = _names_ending(windows, table, 0)  # (B, T + 1, S), from the token before the call
    starts, held = found[:, :-1, 0], found[:, 1:, 1:].any(dim=-1)
    return (starts if valid is None else starts & valid.to(starts.device)), held, recent


def hold_queries(
    queries: torch.Tensor, held: torch.Tensor, previous: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``queries`` (B, T, D) where each ``held`` token (B, T) takes the query of the last token before it that is
    not held (``previous`` (B, D): the last one of earlier calls). Returns them and each row's last query."""
    position = torch.arange(held.shape[1], device=held.device).expand_as(held)
    source = torch.where(held, -1, position).cummax(dim=1).values
    kept = queries.gather(1, source.clamp_min(0)[..., None].expand_as(queries))
    if previous is not None:
        kept = torch.where((source < 0)[..., None], previous[:, None].to(kept), kept)
    return kept, kept[:, -1]


def token_counts(x: torch.Tensor, valid: torch.Tensor | None, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """How many valid tokens (B, T) have been read up to each position of ``x`` (B, T, ...), after ``prefix`` (B, 1)."""
    weight = torch.ones(x.shape[:2], device=x.device) if valid is None else valid.float()
    counts = weight.cumsum(dim=1)
    return counts if prefix is None else counts + prefix.to(counts)


def named_subjects(
    ids: torch.Tensor, names: torch.Tensor, valid: torch.Tensor | None = None, recent: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which subject names (S, L) end at each token of ``ids`` (B, T): (B, T, S) booleans, and the last L - 1 ids
    read (B, L - 1) to continue from. A name is its tokens right-aligned, -1 before them (a row of -1 names nothing);
    ``recent`` are the ids read before ``ids`` (cached generation), so a name split across calls is found too."""
    ids = ids.to(names.device)  # the model's input device may not be this layer's
    windows, recent = _id_windows(ids, names.shape[1], valid, recent)  # (B, T, L): the ids ending at each token
    if torch.compiler.is_compiling():  # static shapes: every name, every column
        return _names_ending(windows, names, 0), recent
    # only names whose last id occurs can end in this call, and columns no name reaches are skipped
    ending = torch.isin(names[:, -1], ids).nonzero()[:, 0]
    named = windows.new_zeros(*ids.shape, names.shape[0], dtype=torch.bool)
    named[..., ending] = _names_ending(windows, names[ending], int((names[ending] < 0).all(dim=0).sum()))
    return named, recent


def _id_windows(
    ids: torch.Tensor, width: int, valid: torch.Tensor | None, recent: torch.Tensor | None, earlier: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` ids ending at each token of ``ids`` (B, T) and at the ``earlier`` tokens read before it
    (B, earlier + T, width), padding and ids never read as -2, after ``recent`` (B, width - 1 + earlier): the ids read
    before ``ids``. Returns them and the last width - 1 + earlier ids read, to continue from."""
    ids = ids if valid is None else ids.masked_fill(~valid.to(ids.device), -2)  # padding breaks a sequence
    kept = width - 1 + earlier
    if recent is None:
        recent = ids.new_full((ids.shape[0], kept), -2)
    read = torch.cat([recent.to(ids), ids], dim=1)
    return read.unfold(1, width, 1), read[:, read.shape[1] - kept :]


def _names_ending(windows: torch.Tensor, names: torch.Tensor, first: int) -> torch.Tensor:
    """Which ``names`` (S, L) end at each window (B, T, L) of ids, comparing columns ``first`` to L - 1."""
    named = (names >= 0).any(dim=1).expand(*windows.shape[:2], -1)
    for column in range(first, names.shape[1]):
        wanted = names[:, column]
        named = named & ((windows[..., column, None] == wanted) | (wanted < 0))
    return named


def subject_presence(
    scores: torch.Tensor,
    counts: torch.Tensor,
    valid: torch.Tensor | None,
    prefix: torch.Tensor | None = None,
    margin: float | None = None,
    named: torch.Tensor | None = None,
) -> torch.Tensor:
    """For subject-key scores of every token (B, T, S): the best score up to each position, continuing ``prefix``.

    ``counts`` (B, T) numbers the valid tokens read so far (1 = a sequence's first token). The first token and
    padding never count: a decoder's first position is an attention sink whose state is alike for every text.
    With a ``margin``, a token counts only for the subjects it matches within ``margin`` of its best match: a token
    names one subject, so one that merely resembles an edited subject's key no longer reads it when another edited
    subject is the better match. Where ``named`` (B, T, S) says a subject's name ends, its score is 1 (any token).
    """
    ignored = (counts <= 1 if valid is None else (counts <= 1) | ~valid)[..., None]
    if named is not None:
        scores = scores.masked_fill(named, 1.0)
        ignored = ignored & ~named
    if margin is not None and scores.shape[-1] > 0:
        ignored = ignored | (scores < scores.max(dim=-1, keepdim=True).values - margin)
    scores = scores.masked_fill(ignored, float("-inf"))
    if prefix is not None:
        scores = torch.cat([prefix[:, None], scores], dim=1)
    best = running_max(scores)
    return best if prefix is None else best[:, 1:]


def running_max(x: torch.Tensor) -> torch.Tensor:
    """``x.cummax(dim=1).values`` for x (B, T, ...) in log2(T) element-wise steps (a Hillis-Steele scan), several
    times faster than ``cummax`` along a middle dimension, and exact: the maximum is associative."""
    shift = 1
    while shift < x.shape[1]:
        x = torch.cat([x[:, :shift], torch.maximum(x[:, shift:], x[:, :-shift])], dim=1)
        shift *= 2
    return x


def whitening_statistics(samples: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, top-``rank`` principal basis and scales that whiten ``samples`` (n, d).

    The returned scales hold one factor per principal direction followed by one factor for the remaining
    directions. Layer inputs are strongly anisotropic (any two prompts have cosine ~0.95), so routing compares
    queries only after centring and whitening them against generic text.
    """
    samples = samples.to(torch.float64)
    n, dim = samples.shape
    mean = samples.mean(dim=0)
    centred = samples - mean
    total_variance = centred.pow(2).sum() / n
    eps = 0.05 * total_variance / dim  # shrinkage: 5% of the average variance per direction
    k = max(0, min(rank, n - 1, dim))
    basis = torch.zeros(dim, rank, dtype=torch.float64)
    scale = torch.ones(rank + 1, dtype=torch.float64)
    explained = torch.zeros((), dtype=torch.float64)
    if k > 0:
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        eigenvalues = singular[:k].pow(2) / n
        basis[:, :k] = vh[:k].T
        scale[:k] = (eigenvalues + eps).rsqrt()
        explained = eigenvalues.sum()
    residual = (total_variance - explained).clamp_min(0) / max(dim - k, 1)
    scale[k:] = (residual + eps).rsqrt()
    return mean.float(), basis.float(), scale.float()


def route_projection(basis: torch.Tensor, scale: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """The (d, k) matrix that maps centred queries into the k-dimensional routing space, ``k = min(dim, d)``.

    Whitening is ``W = B diag(scale[:-1]) B^T + scale[-1] (I - B B^T)`` (see :func:`whitening_statistics`). With
    ``k = d`` the projection is ``W`` itself. With fewer dimensions, the r whitened principal directions are kept
    exactly and the residual ``scale[-1] (I - B B^T)`` is reduced to ``k - r`` dimensions by a fixed Gaussian
    projection (Johnson-Lindenstrauss), so that inner products of whitened queries, and with them routing decisions,
    are kept up to a small error while keys cost k instead of d numbers.
    """
    d, rank = basis.shape
    basis, scale = basis.to(torch.float64), scale.to(torch.float64)
    if dim >= d:
        return (scale[-1] * torch.eye(d, dtype=torch.float64) + (basis * (scale[:-1] - scale[-1])) @ basis.T).float()
    kept = min(rank, dim)
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(d, dim - kept, generator=generator, dtype=torch.float64) / max(dim - kept, 1) ** 0.5
    residual = scale[-1] * (random - basis @ (basis.T @ random))
    return torch.cat([basis[:, :kept] * scale[:kept], residual], dim=1).float()


def whiten(pooled: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``(pooled - mean) @ projection`` (see :func:`route_projection`), optionally L2-normalized."""
    query = (pooled - mean) @ projection
    return F.normalize(query, dim=-1) if normalize else query


def select_experts(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_expert: torch.Tensor,
    key_threshold: torch.Tensor,
    num_experts: int,
    top_k: int,
    temperature: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each query (..., d) to at most ``top_k`` experts by its scores on the anchor ``keys`` (N, d).

    A key counts where its score reaches its threshold and, where ``allowed`` (..., N) is given, where it allows;
    the rest is :func:`experts_from_scores`.
    """
    scores = queries @ keys.T
    blocked = scores < key_threshold if allowed is None else (scores < key_threshold) | ~allowed
    return experts_from_scores(scores.masked_fill(blocked, float("-inf")), key_expert, num_experts, top_k, temperature)


def experts_from_scores(
    scores: torch.Tensor, key_expert: torch.Tensor, num_experts: int, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``top_k`` experts for anchor scores (..., N), -inf where an anchor may not serve.

    An expert's score is the best score of its anchors; experts with only -inf are not candidates, and a query
    with no candidate keeps the base FFN's output. On equal scores the newest expert wins, so re-editing a fact
    overrides the earlier edit. Returns expert indices (..., k), -1 where none, and mixing weights (..., k) that
    sum to 1 over the chosen experts.
    """
    per_expert = scores.new_full((*scores.shape[:-1], num_experts), float("-inf"))
    per_expert = per_expert.scatter_reduce(-1, key_expert.expand_as(scores), scores, reduce="amax")
    newest_first = per_expert.flip(-1)  # max and a stable sort then keep the newest of equal scores first
    k = min(top_k, num_experts)
    if k == 1:
        top_scores, order = newest_first.max(dim=-1, keepdim=True)
    else:
        top_scores, order = newest_first.sort(dim=-1, descending=True, stable=True)
        top_scores, order = top_scores[..., :k], order[..., :k]
    experts = num_experts - 1 - order
    chosen = torch.isfinite(top_scores)
    weights = torch.softmax((top_scores / temperature).masked_fill(~chosen, float("-inf")), dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows without any candidate
    return experts.masked_fill(~chosen, -1), weights


def last_routes(experts: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The experts (B, k) of each row's last valid token, from routes (B, T, k)."""
    if valid is None:
        return experts[:, -1]
    last = valid.long().cumsum(dim=1).argmax(dim=1)  # the first position holding the final count: the last valid one
    return experts[torch.arange(experts.shape[0], device=experts.device), last]


def keep_experts(experts: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes (B, T, k) restricted to the experts ``kept`` (B, k) per row (-1: none), mixing weights renormalized
    over the experts left (a row left with none keeps the base FFN's output)."""
    keep = (experts[..., None] == kept[:, None, None, :]).any(dim=-1) & (experts >= 0)
    weights = weights * keep
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return experts.masked_fill(~keep, -1), weights


class LayerInputs(NamedTuple):
    """A LEMoE layer's input in one forward call, as :meth:`LEMoEModel.capture_layer_inputs` records it."""

    x: torch.Tensor  # (B, T, d_in)
    valid: torch.Tensor | None  # (B, T) real (non-padding) tokens; None: no padding
    ids: torch.Tensor | None  # (B, T) the input ids; None: the call passed embeddings


@dataclass
class CallContext:
    """What the routing layers need to know about the forward call in progress."""

    tokens: tuple[int, int] | None  # (B, T) of this call's input ids, if known
    ids: torch.Tensor | None  # (B, T) this call's input ids (None: the call passed embeddings)
    valid: torch.Tensor | None  # (B, T) mask of real (non-padding) tokens among this call's tokens
    prefix: dict[int, RouteState]  # routing state per layer before this call (cached generation)
    updated: dict[int, RouteState] = field(default_factory=dict)  # routing state per layer after this call


def _first_tensor(args: tuple, kwargs: dict, names: tuple[str, ...]) -> torch.Tensor | None:
    for name in names:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def _cache_of(mapping: Any) -> Any:
    """The KV cache passed to (kwargs) or returned by (model output) a forward call, if any."""
    names = mapping.keys() if isinstance(mapping, dict) else dir(mapping)
    for name in ("cache", "past_key_values"):
        if name in names:
            value = mapping[name] if isinstance(mapping, dict) else getattr(mapping, name)
            if hasattr(value, "get_seq_length"):
                return value
    return None


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (loss, logits, tuples of hidden states) that backward passes start from."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
    tensors = []
    for value in values:
        tensors += [t for t in (value if isinstance(value, tuple) else [value]) if isinstance(t, torch.Tensor)]
    return [t for t in tensors if t.requires_grad]


def _same_padding(a: CallContext, b: CallContext) -> bool:
    if a.tokens != b.tokens or (a.valid is None) != (b.valid is None):
        return False
    return a.valid is None or torch.equal(a.valid, b.valid)


@dataclass
class RoutingDecisions:
    """Routing decisions kept for reuse while an expert trains: every step feeds the same batch again, and the inputs
    of the ``layers`` (the lowest LEMoE layer: nothing trained lies below it) stay the same, so their routing does
    too. Decisions are keyed by layer, adapter and ``part`` (the rows of the batch a forward call sees)."""

    layers: frozenset[int]  # id() of the layers whose decisions may be reused
    part: Any = None
    stored: dict[tuple[int, str, Any], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @contextlib.contextmanager
    def reuse(self, part: Any) -> Iterator[None]:
        """Forward calls inside this context see rows ``part`` of the batch."""
        self.part = part
        try:
            yield
        finally:
            self.part = None


class RoutingSession:
    """Forward hooks on the wrapped model that give every LEMoE layer its padding mask and, during cached
    generation, the running sums of the tokens it saw in earlier calls (keyed by the KV-cache object).

    Gradient checkpointing runs layers again during the backward pass, outside the model's forward call: there the
    layers get the context of the forward call being differentiated (see :meth:`context`)."""

    def __init__(self) -> None:
        self.current: CallContext | None = None
        self._differentiating: list[CallContext] = []  # contexts of the forward calls whose backward pass runs
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._state_by_cache: weakref.WeakKeyDictionary[Any, dict[int, RouteState]] = weakref.WeakKeyDictionary()
        self._warned = False
        self.decisions: RoutingDecisions | None = None  # routing reused across training steps, if any

    def before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = _first_tensor(args, kwargs, ("input_ids", "inputs_embeds"))
        mask = kwargs.get("attention_mask")
        valid = None
        if tokens is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid = mask[:, -tokens.shape[1] :].bool()
        cache = _cache_of(kwargs)
        prefix = self._state_by_cache.get(cache) if cache is not None else None
        if cache is not None and prefix is None and cache.get_seq_length() > 0 and not self._warned:
            self._warned = True
            logger.warning(
                "LEMoE continues from a KV cache it did not fill; routing of the new tokens ignores the cached prefix."
            )
        shape = tuple(tokens.shape[:2]) if tokens is not None else None
        ids = tokens if tokens is not None and not tokens.is_floating_point() else None
        self.current = CallContext(tokens=shape, ids=ids, valid=valid, prefix=prefix or {})

    def after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        context, self.current = self.current, None
        cache = _cache_of(output) or _cache_of(kwargs)
        if context is not None and cache is not None:
            # also when no layer routed (adapters disabled, no anchors yet): the cache is known, not foreign
            self._state_by_cache[cache] = context.updated
        if context is not None and torch.is_grad_enabled():
            for tensor in _output_tensors(output):
                tensor.register_hook(self._backward_hook(context))

    def _backward_hook(self, context: CallContext) -> Any:
        """A gradient hook on the output of a forward call: makes ``context`` available to the layers that
        gradient checkpointing recomputes while this backward pass runs, and withdraws it when the pass ends."""

        def leave() -> None:
            self._differentiating = [c for c in self._differentiating if c is not context]

        def enter(grad: torch.Tensor) -> None:
            if all(c is not context for c in self._differentiating):
                self._differentiating.append(context)
                torch.autograd.Variable._execution_engine.queue_callback(leave)

        return enter

    def context(self, rows: int) -> CallContext | None:
        """The context of the forward call in progress or, for a layer recomputed in a backward pass (gradient
        checkpointing), of the forward call being differentiated whose batch has ``rows`` rows (B, or B * T)."""
        if self.current is not None or not self._differentiating:
            return self.current
        matching = [
            c for c in self._differentiating if c.tokens is None or rows in (c.tokens[0], c.tokens[0] * c.tokens[1])
        ]
        if any(not _same_padding(matching[0], c) for c in matching[1:]):
            raise RuntimeError(
                "LEMoE cannot tell which of several forward passes with different padding a gradient-checkpointed "
                "layer belongs to: call backward() on each forward pass's loss before the next forward pass."
            )
        return matching[0] if matching else None

    def attach(self, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        return [
            model.register_forward_pre_hook(self.before_forward, with_kwargs=True),
            model.register_forward_hook(self.after_forward, with_kwargs=True),
        ]
