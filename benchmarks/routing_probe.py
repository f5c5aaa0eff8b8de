"""Why LEMoE routes the way it does: routing-only measurements on held-out data (no training).

For each design, anchors are built from edit prompts (+ targets) exactly as the editor builds them, then rephrased
prompts (which should reach their own edit's expert) and locality prompts (which should reach no expert) are
routed. Reported per design: the share of rephrase decision positions routed to their own expert (higher is
better for generality) and of locality decision positions routed to any expert (lower is better for locality).

    python -m benchmarks.routing_probe            # ZsRE test-all (KnowEdit) and CounterFact train, 300 edits each
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lemoe_peft.editor import calibration_texts
from lemoe_peft.routing import causal_mean, whiten, whitening_statistics
from lemoe_peft.teacher_forcing import encode

from .data import load_base, requests_for


def _layer_inputs(model, tokenizer, pairs, layer: int, batch_size: int = 32):
    """Per pair: the down_proj input at ``layer`` (T, d) and the mask of positions that predict the answer."""
    captured = {}
    module = model.model.layers[layer].mlp.down_proj
    handle = module.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    rows = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = encode(tokenizer, pairs[start : start + batch_size])
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            for i in range(batch.input_ids.shape[0]):
                length = int(batch.attention_mask[i].sum())
                rows.append((captured["x"][i, :length], batch.predicts[i, :length]))
    finally:
        handle.remove()
    return rows


def _queries(rows, pooling: str, stats) -> list[torch.Tensor]:
    out = []
    for x, predicts in rows:
        pooled = x[None].float() if pooling == "token" else causal_mean(x[None])[0]
        out.append(whiten(pooled[0], *stats, normalize=True)[predicts])
    return out


def probe(dataset: str, edits: int, layers: list[int], threshold: float, cache: Path) -> list[str]:
    model, tokenizer = load_base(cache)
    requests = [r for r in requests_for(dataset, edits, tuning=True) if r.rephrase_prompts and r.locality]
    calibration = [(t, t) for t in calibration_texts()]  # any answer: only the prompt positions are used
    lines = [
        f"#### {dataset} (held-out: {len(requests)} edits), threshold {threshold}",
        "",
        "| layer | query | whitening | anchors | rephrase -> own expert | locality -> any expert |",
        "|---:|---|---|---|---:|---:|",
    ]
    for layer in layers:
        edit_rows = _layer_inputs(model, tokenizer, [(r.prompt, r.target_new) for r in requests], layer)
        rephrase_rows = _layer_inputs(
            model, tokenizer, [(r.rephrase_prompts[0], r.target_new) for r in requests], layer
        )
        locality_rows = _layer_inputs(
            model, tokenizer, [(r.locality[0].prompt, r.locality[0].answer) for r in requests], layer
        )
        calibration_rows = _layer_inputs(model, tokenizer, calibration, layer)
        for pooling in ("token", "causal_mean"):
            for rank in (0, 64):
                samples = torch.cat(
                    [x.float() if pooling == "token" else causal_mean(x[None])[0][0] for x, _ in calibration_rows]
                )
                stats = whitening_statistics(samples, rank)
                keys = _queries(edit_rows, pooling, stats)
                rephrase = _queries(rephrase_rows, pooling, stats)
                locality = _queries(locality_rows, pooling, stats)
                for anchors in ("per edit", "batch centroid"):
                    owner = torch.arange(len(keys)) if anchors == "per edit" else torch.arange(len(keys)) // 10
                    if anchors == "per edit":
                        bank = torch.cat(keys)
                        bank_owner = torch.cat(
                            [torch.full((len(k),), int(o)) for k, o in zip(keys, owner, strict=True)]
                        )
                    else:
                        groups = owner.max().item() + 1
                        bank = torch.stack(
                            [
                                F.normalize(
                                    torch.cat([keys[i] for i in range(len(keys)) if owner[i] == g]).mean(0), dim=0
                                )
                                for g in range(groups)
                            ]
                        )
                        bank_owner = torch.arange(groups)
                    hits = [
                        ((q @ bank.T).max(1).values >= threshold) & (bank_owner[(q @ bank.T).argmax(1)] == owner[i])
                        for i, q in enumerate(rephrase)
                    ]
                    false = [(q @ bank.T).max(1).values >= threshold for q in locality]
                    lines.append(
                        f"| {layer} | {pooling} | {'rank 64' if rank else 'centre only'} | {anchors} | "
                        f"{torch.cat(hits).float().mean():.2f} | {torch.cat(false).float().mean():.2f} |"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--layers", nargs="+", type=int, default=[18, 24])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "routing_probe.md")
    args = parser.parse_args()
    cache = Path("bench-results") / "cache" / "smollm2-f32"
    lines = []
    for dataset in ("zsre", "counterfact"):
        lines += probe(dataset, args.edits, args.layers, args.threshold, cache) + [""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
