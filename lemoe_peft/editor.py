"""``LEMoEEditor``: lifelong editing of a PEFT-wrapped model with LEMoE.

For every batch of requests: insert a new expert (earlier experts are frozen), give it anchor keys computed from the
batch's own routing queries at the positions that predict the new targets, then train only that expert on the
targets, with the routing used at inference. Requests are cut into batches in arrival order, or by clustering (order
planning, ``plan_order=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpoint import has_checkpoint, restore_checkpoint, save_checkpoint
from .config import LEMoEConfig
from .edit_log import edited_fingerprints, fingerprint
from .generation import greedy_token_continuations
from .model import LEMoEModel
from .models import input_device
from .negatives import negative_prompts, subject_span
from .planning import plan_batches
from .replay import LowerLayerReplay
from .requests import EditRequest
from .routing import chat_markers, token_marks
from .teacher_forcing import (
    TeacherForcedBatch,
    answer_logits,
    encode,
    has_chat_template,
    span_tokens,
    subject_spellings,
    token_position,
    token_rows,
    with_rows,
    with_tails,
    word_boundary_tokens,
)
from .training import Objective, fit

logger = logging.getLogger(__name__)


# training precision -> the autocast dtype of the training passes (None: plain float32)
TRAIN_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class EditorSettings:
    """How edits are trained. The defaults were chosen on SmolLM2-135M with held-out data (see BENCHMARKS.md)."""

    batch_size: int = dataclasses.field(
        default=2,
        metadata={
            "help": "Edits per expert (one expert per batch; on held-out data two generalized best under generation)."
        },
    )
    max_steps: int = dataclasses.field(default=60, metadata={"help": "Most optimisation steps per batch."})
    learning_rate: float = dataclasses.field(default=3e-2, metadata={"help": "Adam learning rate of each expert."})
    early_stop_loss: float = dataclasses.field(
        default=0.02, metadata={"help": "Stop training a batch once its loss is below this."}
    )
    plan_order: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Cluster pending edits so related ones share an expert (off: arrival order, which generalized "
            "better on held-out data)."
        },
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the planning and of each new expert."})
    anchor_threshold: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Score an input needs to reach a new expert's anchors (default: the config's route_threshold).",
            "aliases": ["--threshold"],
        },
    )
    preserve_weight: float = dataclasses.field(
        default=1.0, metadata={"help": "Weight of keeping other prompt positions' predictions (0: off)."}
    )
    negatives_per_edit: int = dataclasses.field(
        default=0,
        metadata={
            "help": "Prompts per edit whose predictions the new expert is trained to keep: its prompt with another "
            "subject, then its subject in other relations (0: none; on held-out data they cost generality)."
        },
    )
    train_dtype: str = dataclasses.field(
        default="float32",
        metadata={
            "help": "Precision of the training passes: float32, or bfloat16 / float16 mixed precision (autocast; "
            "experts, losses and routing stay float32). bfloat16 trains about twice as fast on CPUs with native "
            "bfloat16 arithmetic (AVX512-BF16, AMX) and on GPUs; elsewhere it is slower."
        },
    )
    end_answers: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "Train the token after each answer to start a new word (a space, punctuation, a newline or EOS), "
            "so that generation stops the answer where the target stops."
        },
    )
    negative_continuation: int = dataclasses.field(
        default=2, metadata={"help": "Tokens of the unedited model's continuation of each negative that are kept too."}
    )
    answer_continuation: int = dataclasses.field(
        default=0,
        metadata={
            "help": "Tokens of the unedited model's continuation after each answer (from its likeliest word-ending "
            "token) where the new expert must keep the unedited predictions, so that it stops acting once the answer "
            "is written: generation repeats the answer less often, and locality rises, at a cost in generality "
            "(0: off)."
        },
    )
    chat_form: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Also train each edit as the reply to its prompt sent through the tokenizer's chat template, as "
            "users of an instruct model ask (no effect for a tokenizer without a chat template)."
        },
    )
    subject_lead: str | None = dataclasses.field(
        default="Tell me about {}",
        metadata={
            "help": "A lead with one '{}': each edit's subject also gets the key it has when read after this lead, so "
            "prompts that word the text before the subject differently read it too ('' or None: only the subject as "
            "the edit prompt reads it). Unused where subjects are read by name only (route_subject_names='only')."
        },
    )

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.early_stop_loss >= 0, "early_stop_loss must be >= 0"),
            (self.preserve_weight >= 0, "preserve_weight must be >= 0"),
            (self.negatives_per_edit >= 0, "negatives_per_edit must be >= 0"),
            (self.negative_continuation >= 0, "negative_continuation must be >= 0"),
            (self.answer_continuation >= 0, "answer_continuation must be >= 0"),
            (self.train_dtype in TRAIN_DTYPES, f"train_dtype must be one of {sorted(TRAIN_DTYPES)}"),
            (
                not self.subject_lead or self.subject_lead.count("{}") == 1,
                "subject_lead must hold exactly one '{}' (where the subject goes)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid editor setting: {message}.")


@dataclasses.dataclass
class EditReport:
    """What one call of :meth:`LEMoEEditor.edit` did."""

    batches: list[dict[str, Any]]
    skipped: int
    seconds: float

    @property
    def num_edits(self) -> int:
        return sum(len(batch["requests"]) for batch in self.batches)

    @property
    def seconds_per_edit(self) -> float:
        return self.seconds / max(self.num_edits, 1)


@dataclasses.dataclass
class _OpenExpert:
    """An expert between :meth:`LEMoEEditor.open_expert` and :meth:`LEMoEEditor.close_expert`."""

    expert: int
    requests: list[EditRequest]
    batch: TeacherForcedBatch
    captured: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # each LEMoE layer's input before training
    replay: LowerLayerReplay
    started: float


def calibration_texts() -> list[str]:
    """Generic sentences (written for this package, disjoint from every evaluation set) that calibrate routing."""
    text = resources.files("lemoe_peft").joinpath("resources/calibration.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def as_request(request: EditRequest | Mapping[str, Any]) -> EditRequest:
    return request if isinstance(request, EditRequest) else EditRequest.from_dict(request)


class LEMoEEditor:
    """Edits facts into ``model`` (a ``PeftModel`` with a LEMoE adapter), one new expert per batch.

    Keyword arguments are :class:`EditorSettings`. ``calibration`` replaces the generic sentences that calibrate
    routing before the first edit (never use evaluation data for it).
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        adapter_name: str | None = None,
        calibration: Sequence[str] | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, PeftModel) or not isinstance(model.base_model, LEMoEModel):
            raise TypeError("LEMoEEditor needs a PeftModel with a LEMoE adapter: get_peft_model(model, LEMoEConfig()).")
        self.model = model
        self.tokenizer = tokenizer
        self.tuner: LEMoEModel = model.base_model
        self.adapter = self.tuner.resolve_adapter(adapter_name)
        if self.adapter not in self.tuner.active_adapters:
            raise ValueError(
                f"Adapter '{self.adapter}' is not active, so it would not route: "
                f"call model.set_adapter('{self.adapter}') before editing it."
            )
        self.settings = EditorSettings(**settings)
        threshold = self.settings.anchor_threshold
        if threshold is not None and self.config.route_similarity == "cosine" and not -1 <= threshold <= 1:
            raise ValueError(f"Invalid editor setting: a cosine anchor_threshold must lie in [-1, 1], got {threshold}.")
        self.calibration = list(calibration) if calibration is not None else calibration_texts()
        if not self.calibration:
            raise ValueError("`calibration` needs at least one generic sentence (None: the built-in ones).")
        self.device = input_device(model)
        self._open: _OpenExpert | None = None
        self._word_boundary: torch.Tensor | None = None

    @property
    def config(self) -> LEMoEConfig:
        return self.model.peft_config[self.adapter]

    # ------------------------------------------------------------------------------------------------------ stream
    def edit(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any]],
        *,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 1,
        progress: bool = True,
    ) -> EditReport:
        """Edit ``requests`` (a batch or a whole stream). Requests already in the adapter's edit log are skipped, so
        rerunning after an interruption continues where it stopped; with ``checkpoint_dir`` the adapter folder is
        saved atomically every ``checkpoint_every`` batches and at the end, and resumed from if it is ahead."""
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1.")
        requests = [as_request(r) for r in requests]
        started = time.perf_counter()
        if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
            self._resume(checkpoint_dir)
        done = edited_fingerprints(self.config.edit_log)
        batches: list[list[EditRequest]] = []
        if any(fingerprint(r) not in done for r in requests):
            self.ensure_calibrated()
            # Plan every request, done or not, so that a resumed stream cuts the batches an uninterrupted one did.
            batches = [[r for r in batch if fingerprint(r) not in done] for batch in self.plan(requests)]
            batches = [batch for batch in batches if batch]
        skipped = len(requests) - sum(map(len, batches))
        if skipped:
            logger.info("Skipping %d requests that the adapter already holds.", skipped)
        records = []
        for number, batch in enumerate(tqdm(batches, desc="LEMoE edits", unit="batch", disable=not progress), 1):
            records.append(self.edit_batch(batch))
            if checkpoint_dir is not None and (number % checkpoint_every == 0 or number == len(batches)):
                save_checkpoint(self.model, checkpoint_dir, self.adapter)
        return EditReport(records, skipped, time.perf_counter() - started)

    def _resume(self, checkpoint_dir: str) -> None:
        saved_log = LEMoEConfig.from_pretrained(checkpoint_dir).edit_log
        current_log = self.config.edit_log
        common = min(len(saved_log), len(current_log))
        if [b["requests"] for b in saved_log[:common]] != [b["requests"] for b in current_log[:common]]:
            raise ValueError(
                f"The checkpoint in {checkpoint_dir} holds a different edit history than this model, and saving "
                "would overwrite it; load it with PeftModel.from_pretrained or choose another checkpoint folder."
            )
        if len(saved_log) > len(current_log):
            restore_checkpoint(self.model, checkpoint_dir, self.adapter)

    def plan(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        """Cut ``requests`` into batches: by cluster of their routing queries when order planning is on."""
        size = self.settings.batch_size
        if not self.settings.plan_order or len(requests) <= size:
            return [list(requests[i : i + size]) for i in range(0, len(requests), size)]
        embeddings = self._prompt_embeddings([r.prompt for r in requests])
        return [[requests[i] for i in batch] for batch in plan_batches(embeddings, size, self.settings.seed)]

    # -------------------------------------------------------------------------------------------------- one batch
    def edit_batch(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        """Insert an expert for ``requests``, give it anchors, train it, freeze it; return the edit-log record."""
        expert = self.open_expert(requests)
        opened = self._opened()
        preserve = self._preserved_positions(expert, opened.batch, opened.captured)
        with self.tuner.reuse_routing(self.adapter) as decisions:

            @contextlib.contextmanager
            def replayed(rows: slice) -> Iterator[None]:  # the lower layers' output and the routing of these rows
                with opened.replay.replay(rows), decisions.reuse((rows.start, rows.stop)):
                    yield

            steps, loss = fit(
                self.model,
                self.trainable_tensors(),
                Objective(opened.batch, preserve, self.settings.preserve_weight, self._answer_end()),
                max_steps=self.settings.max_steps,
                learning_rate=self.settings.learning_rate,
                early_stop_loss=self.settings.early_stop_loss,
                replay=replayed,
                autocast_dtype=TRAIN_DTYPES[self.settings.train_dtype],
            )
        return self.close_expert(steps=steps, final_loss=round(loss, 5))

    def open_expert(self, requests: Sequence[EditRequest | Mapping[str, Any]]) -> int:
        """Start editing ``requests`` into a new expert and return its index: calibrate routing if it is not yet,
        insert a trainable expert (freezing the earlier ones) and give it anchor keys from the requests' own routing
        queries (gated by their subjects). Train it with any loop (e.g. transformers' ``Trainer`` on
        :class:`lemoe_peft.data.EditDataset`), then call :meth:`close_expert`. :meth:`edit_batch` does all three
        and also trains the expert to leave negative prompts alone (:mod:`lemoe_peft.negatives`)."""
        if self._open is not None:
            raise RuntimeError(f"Expert {self._open.expert} is still open: call close_expert() first.")
        requests = [as_request(r) for r in requests]
        if not requests:
            raise ValueError("open_expert needs at least one edit request.")
        started = time.perf_counter()
        self.ensure_calibrated()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed + self.config.num_experts)
            expert = self.tuner.add_expert(self.adapter)
        self.model.eval()  # no dropout: the routing and the expert see exactly what inference will
        batch = self._with_continuations(self._encoded(requests))
        layers = self.tuner.lemoe_layers(self.adapter)
        replay = LowerLayerReplay(self.tuner.model, list(layers))
        with torch.no_grad(), self.tuner.capture_layer_inputs() as captured, replay.record():
            answer_logits(self.model, batch)
        subject_keys = self._subject_keys(layers, captured, requests, batch)
        anchors = self._anchor_keys(layers, captured, batch)
        self.tuner.add_anchors(expert, anchors, self.settings.anchor_threshold, self.adapter, *subject_keys)
        if self.config.route_subject_tokens == "left_out":  # the batch's own names now leave its anchors' means
            anchors = self._anchor_keys(layers, captured, batch)
            self.tuner.replace_anchors(expert, anchors, self.settings.anchor_threshold, self.adapter, *subject_keys)
        with_negatives = self._with_negatives(expert, requests, batch)
        if with_negatives is not batch:  # else the pass above (the new expert outputs zero) is what training needs
            batch = with_negatives
            with torch.no_grad(), self.tuner.capture_layer_inputs() as captured, replay.record():
                answer_logits(self.model, batch)
        for tensor in self.trainable_tensors():
            tensor.requires_grad_(True)
        self._open = _OpenExpert(expert, requests, batch, captured, replay, started)
        return expert

    def close_expert(self, **details: Any) -> dict[str, Any]:
        """Finish the expert :meth:`open_expert` started: freeze it, take the anchors of upper LEMoE layers again
        (their inputs changed), and append its record to the adapter's edit log, with ``details`` (e.g. ``steps``,
        ``final_loss``) in it. Returns the record."""
        opened = self._opened()
        for tensor in self.trainable_tensors():
            tensor.requires_grad_(False)
        self.model.eval()
        if len(self.tuner.lemoe_layers(self.adapter)) > 1:
            self._refresh_upper_anchors(opened.expert, opened.requests)
        record = {
            "expert": opened.expert,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - opened.started, 3),
            **details,
            "settings": dataclasses.asdict(self.settings),
            "requests": [{**r.to_dict(), "fingerprint": fingerprint(r)} for r in opened.requests],
        }
        self.config.edit_log.append(record)
        self._open = None
        return record

    def _encoded(self, requests: Sequence[EditRequest]) -> TeacherForcedBatch:
        """The requests' prompts and new targets as a teacher-forced batch, also in the chat form if trained."""
        chat = self.settings.chat_form and has_chat_template(self.tokenizer)
        forms = ("written", "chat") if chat else ("written",)
        return encode(self.tokenizer, [(r.prompt, r.target_new) for r in requests], forms)

    def _opened(self) -> _OpenExpert:
        if self._open is None:
            raise RuntimeError("No expert is open: call open_expert(requests) first.")
        return self._open

    @torch.no_grad()
    def _with_negatives(
        self, expert: int, requests: Sequence[EditRequest], batch: TeacherForcedBatch
    ) -> TeacherForcedBatch:
        """``batch`` plus the negative prompts (:mod:`lemoe_peft.negatives`) that the new expert's anchors reach
        most (at most one per request), each followed by the unedited model's greedy continuation."""
        settings = self.settings
        prompts = negative_prompts(requests, settings.negatives_per_edit, settings.seed + expert)
        if not prompts or settings.preserve_weight == 0:
            return batch
        rows = [self.tokenizer(p).input_ids for p in prompts]
        candidates = token_rows(self.tokenizer, rows).to(self.device)
        with self.tuner.capture_layer_inputs() as captured:
            self._forward_inputs(candidates.input_ids, candidates.attention_mask)
        reached = self._routed_to(expert, candidates, captured).sum(dim=1)
        order = sorted((i for i in range(len(rows)) if reached[i] > 0), key=lambda i: -int(reached[i]))
        rows = [rows[i] for i in sorted(order[: len(requests)])]
        if not rows:
            return batch
        tails = self._unedited_continuations(rows, settings.negative_continuation)
        return with_rows(self.tokenizer, batch, [row + tail for row, tail in zip(rows, tails, strict=True)])

    @torch.no_grad()
    def _with_continuations(self, batch: TeacherForcedBatch) -> TeacherForcedBatch:
        """``batch`` with each answer followed by what the unedited model writes after it: its likeliest token that
        ends the answer, then its greedy continuation (``answer_continuation`` tokens in all). Wherever the new
        expert's anchors reach those positions, training keeps their predictions (:meth:`_preserved_positions`)."""
        count = self.settings.answer_continuation
        if count == 0 or self.settings.preserve_weight == 0:
            return batch.to(self.device)
        tails = self._unedited_continuations(batch.token_lists(), count, first=self._answer_end())
        return with_tails(self.tokenizer, batch, tails).to(self.device)

    def _unedited_continuations(
        self, rows: list[list[int]], count: int, first: torch.Tensor | None = None
    ) -> list[list[int]]:
        """What the unedited model writes after each token row: ``count`` greedy tokens (fewer where it writes EOS),
        generated with a KV cache; ``first`` (vocab,) bool restricts the first of them."""
        with self.model.disable_adapter():
            return greedy_token_continuations(
                self.model, self.tokenizer, rows, [count] * len(rows), batch_size=32, first_tokens=first
            )

    def _routed_to(self, expert: int, batch: TeacherForcedBatch, captured: dict) -> torch.Tensor:
        """Positions (B, L) of ``batch`` that some LEMoE layer routes to ``expert``."""
        routed = torch.zeros_like(batch.predicts)
        for name, layer in self.tuner.lemoe_layers(self.adapter).items():
            experts, _ = layer.route_sequences(self.adapter, *captured[name])
            routed |= (experts == expert).any(dim=-1)
        return routed & batch.attention_mask.bool()

    @torch.no_grad()
    def _refresh_upper_anchors(self, expert: int, requests: Sequence[EditRequest]) -> None:
        """With several LEMoE layers, the trained expert of a lower layer changes what the upper layers see: take
        their anchors again from the edited model, so that inference routes the batch as training intended."""
        batch = self._encoded(requests).to(self.device)
        with self.tuner.capture_layer_inputs() as captured:
            answer_logits(self.model, batch)
        upper = list(self.tuner.lemoe_layers(self.adapter))[1:]
        keys = self._anchor_keys(upper, captured, batch)
        subject_keys = self._subject_keys(upper, captured, requests, batch)
        self.tuner.replace_anchors(expert, keys, self.settings.anchor_threshold, self.adapter, *subject_keys)

    def trainable_tensors(self) -> list[torch.Tensor]:
        """What a batch trains: the newest expert of every LEMoE layer (module insertion freezes the others)."""
        return [
            t for layer in self.tuner.lemoe_layers(self.adapter).values() for t in layer.newest_expert(self.adapter)
        ]

    def _answer_end(self) -> torch.Tensor | None:
        """The tokens that may follow a complete answer (computed once), or None with ``end_answers`` off."""
        if not self.settings.end_answers:
            return None
        if self._word_boundary is None:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            self._word_boundary = word_boundary_tokens(self.tokenizer, vocab_size).to(self.device)
        return self._word_boundary

    def _preserved_positions(self, expert: int, batch, captured: dict) -> torch.Tensor | None:
        """Prompt positions that the new expert's anchors also catch: there the expert must change nothing, which
        teaches it to act on the whole edited question, not on its subject alone."""
        if self.settings.preserve_weight == 0:
            return None
        return self._routed_to(expert, batch, captured) & ~batch.predicts

    # ---------------------------------------------------------------------------------------------------- routing
    def _anchor_keys(self, layer_names: Iterable[str], captured: dict, batch: TeacherForcedBatch) -> dict:
        """Per layer, the routing queries at the batch's decision positions: the anchor keys of its expert."""
        return {name: self._queries(name, captured)[batch.predicts] for name in layer_names}

    def _subject_keys(
        self, layer_names: Iterable[str], captured: dict, requests: Sequence[EditRequest], batch: TeacherForcedBatch
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[list[int]]]:
        """Per layer, the keys of the batch's subjects (the input at a subject's last token, see
        :meth:`LEMoELayer.subject_queries`), for each anchor the index of its request's subject (-1: none), for
        each key the subject it reads, and each key's subject name (its token ids where the key was read). A subject
        at a prompt's first token gets a key no input matches (that position's state is alike for every text), or
        none where the layers do not read names. With a ``subject_lead`` (and keys read) each subject has a second
        key: its last token after the lead. Where the layers read names, a subject gets the names no key has yet (as a
        sentence writes it within, and as a text's first word: :func:`subject_spellings`), on keys no input matches."""
        read_by = self.config.route_subject_names  # "off": keys, "also": keys or names, "only": names
        positions, names = [], []
        for row, request in enumerate(requests):
            span = subject_span(request)
            prompt = request.prompt.rstrip()
            position = None if span is None else token_position(self.tokenizer, prompt, span[1])
            if position is not None and (position >= 1 or read_by != "off") and batch.predicts[row, position:].any():
                positions.append((row, position))
                names.append(span_tokens(self.tokenizer, prompt, *span))
        index = torch.full((len(requests),), -1, dtype=torch.long)
        for number, (row, _) in enumerate(positions):
            index[row] = number
        rows = torch.tensor([row for row, _ in positions], dtype=torch.long)
        columns = torch.tensor([position for _, position in positions], dtype=torch.long)
        layers = self.tuner.lemoe_layers(self.adapter)
        inputs = {name: captured[name][0][rows, columns] for name in layer_names}
        subjects = {name: layers[name].subject_queries(self.adapter, inputs[name]) for name in layer_names}
        for keys in subjects.values():
            keys[(columns < 1).to(keys.device)] = 0  # read by name only
        alias = list(range(len(positions)))
        subject_of = [requests[row].subject for row, _ in positions]

        def add_keys(new_keys: dict[str, torch.Tensor], reads: list[int], new_names: list[list[int]]) -> None:
            for name in subjects:
                subjects[name] = torch.cat([subjects[name], new_keys[name]])
            alias.extend(reads)
            names.extend(new_names)

        if self.settings.subject_lead and read_by != "only" and positions:
            leads = [self.settings.subject_lead.format(subject) for subject in subject_of]
            lead_inputs = self._last_token_inputs(leads)
            start = self.settings.subject_lead.index("{}")
            add_keys(
                {name: layers[name].subject_queries(self.adapter, lead_inputs[name]) for name in layer_names},
                list(range(len(positions))),
                [span_tokens(self.tokenizer, t, start, start + len(s)) for t, s in zip(leads, subject_of, strict=True)],
            )
        if read_by != "off":  # names no key has yet: the subject as other texts may write it
            spelled = [set() for _ in positions]
            for reads, name in zip(alias, names, strict=True):
                spelled[reads].add(tuple(name))
            extra = []
            for i, subject in enumerate(subject_of):
                for name in subject_spellings(self.tokenizer, subject):
                    if tuple(name) not in spelled[i]:
                        spelled[i].add(tuple(name))
                        extra.append((i, name))
            unmatched = {name: keys.new_zeros(len(extra), keys.shape[1]) for name, keys in subjects.items()}
            add_keys(unmatched, [i for i, _ in extra], [name for _, name in extra])
        request_of = batch.predicts.nonzero()[:, 0].cpu() % len(requests)  # the chat-form rows follow the written
        return subjects, index[request_of], torch.tensor(alias, dtype=torch.long), names

    def _forward_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A forward pass run for the LEMoE layers' inputs (captured by the caller), not for its logits: the output
        projection, a fifth of a small model's work, runs for one position only."""
        self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)

    @torch.no_grad()
    def _last_token_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per LEMoE layer, its input (n, d_in) at the last token of each text, as the model stands."""
        rows = token_rows(self.tokenizer, [self.tokenizer(t).input_ids for t in texts]).to(self.device)
        with self.tuner.capture_layer_inputs() as captured:
            self._forward_inputs(rows.input_ids, rows.attention_mask)
        last = rows.attention_mask.sum(dim=1) - 1
        return {name: inputs.x[torch.arange(len(texts)), last] for name, inputs in captured.items()}

    def _queries(self, layer_name: str, captured: dict) -> torch.Tensor:
        layer = self.tuner.lemoe_layers(self.adapter)[layer_name]
        return layer.route_queries(self.adapter, layer.pooled_queries(self.adapter, *captured[layer_name]))

    @torch.no_grad()
    def _run_prompts(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[dict, torch.Tensor]]:
        """Forward ``texts`` (right-padded) and return, per chunk, the captured layer inputs and the attention mask."""
        self.model.eval()
        chunks = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            tokens = self.tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right")
            tokens = tokens.to(self.device)
            with self.tuner.capture_layer_inputs() as captured, self.model.disable_adapter():
                self._forward_inputs(tokens.input_ids, tokens.attention_mask)
            chunks.append((captured, tokens.attention_mask.bool()))
        return chunks

    def ensure_calibrated(self) -> None:
        """Fit the routing whitening on generic text once, before the adapter's first anchor exists."""
        if self.config.route_calibration_size > 0 or self.config.num_anchors > 0:
            return
        if self.config.route_restart != "off":
            self.tuner.set_token_marks(token_marks(self.tokenizer), self.adapter)
        self.tuner.set_chat_markers(*chat_markers(self.tokenizer), self.adapter)
        samples: dict[str, list[torch.Tensor]] = {}
        for captured, mask in self._run_prompts(self.calibration):
            for name, layer in self.tuner.lemoe_layers(self.adapter).items():
                samples.setdefault(name, []).append(layer.pooled_queries(self.adapter, *captured[name])[mask])
        self.tuner.calibrate_routing({name: torch.cat(s) for name, s in samples.items()}, self.adapter)

    def _prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each prompt's routing query at its last token (concatenated over LEMoE layers), used for planning."""
        rows = []
        layers = self.tuner.lemoe_layers(self.adapter)
        for captured, mask in self._run_prompts(prompts):
            last = mask.sum(dim=1) - 1
            per_layer = [self._queries(name, captured)[torch.arange(len(last)), last] for name in layers]
            rows.append(torch.cat(per_layer, dim=-1))
        return torch.cat(rows).cpu()
