"""Inference latency of a LEMoE model relative to its base model, measured in the same process, interleaved: one
forward pass (:func:`measure`, run by ``benchmarks.lifelong``), or ``generate()`` with a KV cache as users run it,
under each ``route_generated_tokens`` rule (:func:`measure_generation`):

    python -m benchmarks.latency --adapter bench-results/full/zsre/adapters/lemoe-T1000
    python -m benchmarks.latency --adapter bench-results/stream/counterfact-train/adapter --forward --out F.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from statistics import median

import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import LEMoEConfig
from lemoe_peft.config import ROUTE_GENERATED_TOKENS
from lemoe_peft.edit_log import write_json_atomic
from lemoe_peft.editor import calibration_texts

from .data import CACHE, load_base, requests_for


def _timed(model, input_ids) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        return time.perf_counter() - started


def measure(cache: Path, adapters: dict[int, Path | None], prompt: str, tokens: int = 32, rounds: int = 40) -> list:
    """Median latency of a ``tokens``-token forward, base vs LEMoE, for each {experts: adapter folder or None}.

    Two inputs: generic text (routed to no expert) and ``prompt`` (an edited fact, routed to one)."""
    base, tokenizer = load_base(cache)
    generic = tokenizer(" ".join(calibration_texts()), return_tensors="pt").input_ids[:, :tokens]
    edited = tokenizer(" ".join([prompt] * tokens), return_tensors="pt").input_ids[:, :tokens]
    rows = []
    for experts, folder in sorted(adapters.items()):
        copy_of_base = copy.deepcopy(base)
        if folder is None:
            model = get_peft_model(copy_of_base, LEMoEConfig(task_type="CAUSAL_LM"))
        else:
            model = PeftModel.from_pretrained(copy_of_base, folder)
        assert model.peft_config["default"].num_experts == experts, (folder, experts)
        for name, input_ids in (("generic text", generic), ("edited prompt", edited)):
            for _ in range(3):  # warm-up
                _timed(base, input_ids), _timed(model, input_ids)
            base_times, model_times = [], []
            for _ in range(rounds):
                base_times.append(_timed(base, input_ids))
                model_times.append(_timed(model, input_ids))
            rows.append(
                {
                    "experts": experts,
                    "anchors": model.peft_config["default"].num_anchors,
                    "input": name,
                    "base_ms": 1000 * median(base_times),
                    "lemoe_ms": 1000 * median(model_times),
                    "ratio": median(model_times) / median(base_times),
                }
            )
        del model
    return rows


def _generation_seconds(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            model.generate(
                **tokenizer(prompt, return_tensors="pt"),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
    return time.perf_counter() - started


def measure_generation(cache: Path, adapter: Path, prompts: list[str], new_tokens: int = 16, rounds: int = 5) -> list:
    """Median time per generated token of greedy ``generate()`` over ``prompts`` (``new_tokens`` each): the base
    model and the adapter loaded under each ``route_generated_tokens`` rule, interleaved round by round."""
    base, tokenizer = load_base(cache)
    models = {"base": base}
    for rule in ROUTE_GENERATED_TOKENS:
        config = LEMoEConfig.from_pretrained(adapter)
        config.route_generated_tokens = rule
        models[rule] = PeftModel.from_pretrained(copy.deepcopy(base), adapter, config=config).eval()
    for model in models.values():  # warm-up
        _generation_seconds(model, tokenizer, prompts[:2], new_tokens)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(_generation_seconds(model, tokenizer, prompts, new_tokens) / (len(prompts) * new_tokens))
    base_time = median(times["base"])
    config = models[ROUTE_GENERATED_TOKENS[0]].peft_config["default"]
    return [
        {
            "model": name if name == "base" else f"LEMoE, route_generated_tokens={name}",
            "experts": 0 if name == "base" else config.num_experts,
            "ms_per_token": 1000 * median(runs),
            "ratio": median(runs) / base_time,
        }
        for name, runs in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a saved LEMoE adapter of SmolLM2")
    parser.add_argument("--prompts", type=int, default=20, help="MEND ZsRE edit prompts generated from")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "generation_latency.json")
    parser.add_argument("--forward", action="store_true", help="time a 32-token forward instead (as the stream does)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.forward:  # generic text, and the adapter's first edit prompt repeated
        config = LEMoEConfig.from_pretrained(str(args.adapter))
        rows = measure(args.cache, {config.num_experts: args.adapter}, config.edit_log[0]["requests"][0]["prompt"])
        write_json_atomic(args.out, {"adapter": str(args.adapter), "rows": rows})
        for row in rows:
            print(f"{row['input']}: {row['lemoe_ms']:.1f} ms, {row['ratio']:.3f}x base", flush=True)
        return
    prompts = [r.prompt for r in requests_for("zsre", args.prompts)]
    rows = measure_generation(args.cache, args.adapter, prompts, args.new_tokens, args.rounds)
    write_json_atomic(args.out, {"adapter": str(args.adapter), "prompts": len(prompts), "rows": rows})
    for row in rows:
        print(f"{row['model']}: {row['ms_per_token']:.1f} ms/token, {row['ratio']:.3f}x base", flush=True)


if __name__ == "__main__":
    main()
