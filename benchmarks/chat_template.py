"""Do edits hold when the question comes through the tokenizer's chat template, as users of an instruct model ask it?

Edit the first T held-out requests (LEMoE, the benchmark's settings) and greedily generate 24 tokens after each edit
prompt, its first rephrase and its locality probes, each once as the raw text the benchmark uses and once wrapped in
the chat template (``apply_chat_template(..., add_generation_prompt=True)``). A chat answer is a sentence ("The head
of government of Munich was ..."), so an edit counts as answered when the target appears in the 24 tokens at word
boundaries (the same rule for both forms, and for the unedited model, which should not name the new target);
locality: the first 8 new tokens equal the unedited model's on the same form. Run once with the edits trained on the
raw prompts (the benchmark's protocol), once also trained in the chat form (the editor's ``chat_form``).

Where routing loses them (routing only, the edits written raw, one training step each): the share of edit prompts
routed to their own expert at the last token, and the median score of the nearest anchor there, for the prompt as
written, in the whole chat form, in the chat form cut after the question (before the assistant's turn starts), and
after the user's turn marker alone (no system message before it). Routed prompts are right-stripped, as the
benchmark's are, so the whole chat form is routed at the assistant's role name, the token before the final newline.

    python -m benchmarks.chat_template --dataset zsre --T 100
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lemoe_peft.edit_log import write_json_atomic
from lemoe_peft.generation import greedy_token_continuations
from lemoe_peft.teacher_forcing import chat_prompt, prompt_ids

from .anchor_thresholds import last_token_routing, own_expert_share
from .data import CACHE
from .methods import SETTINGS, held_out_lemoe

NEW_TOKENS, LOCALITY_TOKENS = 24, 8
SCORES = ("rewrite", "rewrite_unedited", "rephrase", "rephrase_unedited", "locality_other")


def mentions(text: str, target: str) -> bool:
    """Whether ``target`` appears in ``text`` at word boundaries, case and whitespace aside."""
    pattern = r"(?<!\w)" + re.escape(" ".join(target.lower().split())) + r"(?!\w)"
    return re.search(pattern, " ".join(text.lower().split())) is not None


def _generate(model, tokenizer, prompts: list[str], chat: bool) -> list[str]:
    rows = [prompt_ids(tokenizer, p, chat) for p in prompts]
    tokens = greedy_token_continuations(model, tokenizer, rows, [NEW_TOKENS] * len(rows), progress="generate")
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def measure(dataset: str, T: int, edit_form: str, cache: Path) -> dict:
    """Rel / Gen / Loc asked in both forms after editing ``T`` held-out requests trained in ``edit_form`` ("raw", or
    "chat_form": raw and in the chat form)."""
    settings = {**SETTINGS, "chat_form": edit_form == "chat_form"}
    method, tokenizer, requests, _ = held_out_lemoe(dataset, T, settings, cache)
    kinds = {
        "rewrite": [(r.prompt, r.target_new) for r in requests],
        "rephrase": [(r.rephrase_prompts[0], r.target_new) for r in requests if r.rephrase_prompts],
    }
    probes = [p.prompt for r in requests for p in r.locality if p.answer != r.ground_truth]  # other relations
    result: dict = {"dataset": dataset, "T": len(requests), "edits_trained": edit_form, "settings": settings}
    for form in ("raw", "chat"):
        chat = form == "chat"
        with method.model.disable_adapter():
            base_probes = _generate(method.model, tokenizer, probes, chat)
            base_answers = {k: _generate(method.model, tokenizer, [p for p, _ in v], chat) for k, v in kinds.items()}
        edited_probes = _generate(method.model, tokenizer, probes, chat)
        row = {}
        for kind, cases in kinds.items():
            answers = _generate(method.model, tokenizer, [p for p, _ in cases], chat)
            row[kind] = sum(mentions(a, t) for a, (_, t) in zip(answers, cases, strict=True)) / len(cases)
            row[f"{kind}_unedited"] = sum(
                mentions(a, t) for a, (_, t) in zip(base_answers[kind], cases, strict=True)
            ) / len(cases)
            row[f"{kind}_examples"] = [
                {"prompt": p, "target": t, "answer": a} for (p, t), a in list(zip(cases, answers, strict=True))[:5]
            ]
        same = [
            tokenizer(a).input_ids[:LOCALITY_TOKENS] == tokenizer(b).input_ids[:LOCALITY_TOKENS]
            for a, b in zip(edited_probes, base_probes, strict=True)
        ]
        row["locality_other"] = sum(same) / len(same)
        result[form] = row
    return result


def routing_by_form(dataset: str, T: int, cache: Path) -> dict:
    """Per form of the edit prompts: the share routed to their own expert at the last token, and the median score of
    the nearest anchor there."""
    method, tokenizer, requests, experts = held_out_lemoe(dataset, T, {**SETTINGS, "max_steps": 1}, cache)
    layer = next(iter(method.model.base_model.lemoe_layers("default").values()))
    keys, owners = layer.lemoe_keys["default"].float(), layer.lemoe_key_expert["default"]
    thresholds = layer.lemoe_key_threshold["default"].float()

    def forms(prompt: str) -> dict[str, str]:
        prompt = prompt.strip()
        chat = chat_prompt(tokenizer, prompt)
        before = chat[: chat.index(prompt)]
        turn = before[max(before.rfind(special) for special in tokenizer.all_special_tokens) :]
        return {
            "as written": prompt,
            "chat template": chat,
            "chat template, cut after the question": before + prompt,
            "user's turn marker and the question": turn + prompt,
        }

    texts = [forms(r.prompt) for r in requests]
    result = {"dataset": dataset, "T": len(requests), "example": texts[0]}
    for form in texts[0]:
        queries, scores = last_token_routing(method.model, tokenizer, [t[form] for t in texts])
        result[form] = {
            "own_expert": own_expert_share(scores, owners, torch.tensor(experts), thresholds),
            "nearest_anchor_median": float((queries @ keys.T).max(dim=1).values.median()),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "results" / "generation" / "chat_template")
    args = parser.parse_args()
    routing = args.out / f"{args.dataset}-T{args.T}-routing.json"
    if not routing.exists():
        write_json_atomic(routing, routing_by_form(args.dataset, args.T, args.cache))
    for form, row in json.loads(routing.read_text()).items():
        if isinstance(row, dict) and "own_expert" in row:
            print(f"{form}: own expert {row['own_expert']:.3f}, nearest anchor {row['nearest_anchor_median']:.2f}")
    for edit_form in ("raw", "chat_form"):
        path = args.out / f"{args.dataset}-T{args.T}-edits-{edit_form}.json"
        if not path.exists():
            write_json_atomic(path, measure(args.dataset, args.T, edit_form, args.cache))
        result = json.loads(path.read_text())
        for form in ("raw", "chat"):
            row = result[form]
            scores = " ".join(f"{k} {row[k]:.3f}" for k in SCORES)
            print(f"edits trained {edit_form}, asked {form}: {scores}")


if __name__ == "__main__":
    main()
