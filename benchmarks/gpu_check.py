"""One prepared GPU check of lemoe-peft: editing, cached generation vs teacher forcing, save/reload, latency at
Llama-2-7B layer dimensions (4 random layers, bfloat16), and peak memory. Prints (and writes) one JSON object.

    python benchmarks/gpu_check.py --device cuda --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --small            # debug run on the CPU (hidden 256)

On the device image (torch 2.11+cu130, transformers 5.17, huggingface_hub 1.33) carry wheels of transformers 5.24.0,
peft 0.21.2, accelerate 1.15.0, tokenizers 0.23.3 and safetensors 0.8.0 (not huggingface_hub 2.x: it needs httpx2,
which the image lacks; transformers 5.24 runs on the image's 1.33), install them with `pip install --target /tmp/site`
and put /tmp/site and the repository root on PYTHONPATH.

No downloads: the model is built from a LlamaConfig with random weights, the tokenizer is the tests' word-level one.
Each section is wrapped: a failure is recorded with its traceback and the next section still runs; the JSON file is
rewritten after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import lemoe_peft  # noqa: E402
from lemoe_peft import LEMoEConfig, LEMoEEditor, evaluate_edits  # noqa: E402
from lemoe_peft.requests import EditRequest, Probe  # noqa: E402
from tests.helpers import CALIBRATION, FACTS, VOCAB, WORDS, tiny_tokenizer  # noqa: E402

GENERIC = "the danube flows through europe the sky is blue the grass is green"  # every word in WORDS


def build_base(config: LlamaConfig, device: str, dtype: torch.dtype, state: dict | None = None):
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def lemoe_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".lemoe_" in k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--small", action="store_true", help="hidden 256 / intermediate 688 (CPU debugging)")
    parser.add_argument("--experts", type=int, default=1000)
    parser.add_argument("--anchors", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    started = time.perf_counter()

    import peft
    import transformers

    result: dict = {
        "args": vars(args),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "lemoe_peft": getattr(lemoe_peft, "__version__", None),
        },
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "errors": {},
    }

    def write() -> None:
        result["elapsed_s"] = round(time.perf_counter() - started, 1)
        text = json.dumps(result, indent=2, default=str)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return text

    def section(name):
        def wrap(function):
            t0 = time.perf_counter()
            reset_peak(device)
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                out = function()
                if out is not None:
                    result[name] = out
            except Exception:  # noqa: BLE001  (recorded, the next section still runs)
                result["errors"][name] = traceback.format_exc()
                print(result["errors"][name], flush=True)
            result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
            result.setdefault("section_peak_gib", {})[name] = peak_gib(device)
            write()
            print(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)

        return wrap

    tokenizer = tiny_tokenizer()
    dims = (256, 688) if args.small else (4096, 11008)
    config = LlamaConfig(
        vocab_size=VOCAB,  # the tokenizer's ids fit in VOCAB (128)
        hidden_size=dims[0],
        intermediate_size=dims[1],
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=4,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    result["model"] = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
    result["model"]["vocab_size"] = config.vocab_size
    result["model"]["tokenizer_size"] = len(tokenizer)
    state: dict = {}
    box: dict = {}
    subjects = ("paris", "rome", "berlin", "hamlet", "nile", "guernica", "madrid", "oslo")  # gated where not first
    requests = [
        EditRequest(p, t, subject=s, rephrase_prompts=(r,), locality=(Probe("what colour is the sky", "blue"),))
        for (p, t, r), s in zip(FACTS, subjects, strict=True)
    ]
    assert all(w in WORDS for p, t, r in FACTS for w in f"{p} {t} {r}".split())

    @section("build")
    def _():
        base = build_base(config, device, dtype)
        state.update({k: v.detach().clone() for k, v in base.state_dict().items()})
        box["model"] = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
        params = sum(p.numel() for p in base.parameters())
        lemoe_layers = list(box["model"].base_model.lemoe_layers())
        return {"base_parameters": params, "lemoe_layers": lemoe_layers}

    @section("edit")
    def _():
        model = box["model"]
        editor = LEMoEEditor(
            model,
            tokenizer,
            calibration=CALIBRATION,
            batch_size=4,
            max_steps=60,
            learning_rate=3e-2,
            early_stop_loss=0.01,
        )
        sync(device)
        t0 = time.perf_counter()
        report = editor.edit(requests, progress=False)
        sync(device)
        edit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluate_edits(model, tokenizer, requests)
        eval_s = time.perf_counter() - t0
        config_ = model.peft_config["default"]
        return {
            "edit_seconds": round(edit_s, 2),
            "eval_seconds": round(eval_s, 2),
            "num_edits": report.num_edits,
            "batches": len(report.batches),
            "steps_per_batch": [b.get("steps") for b in config_.edit_log],
            "num_experts": config_.num_experts,
            "num_anchors": config_.num_anchors,
            "num_subjects": config_.num_subjects,  # subject keys: two per gated edit (the prompt's, after the lead)
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "lemoe_dtypes": sorted({str(v.dtype) for v in lemoe_tensors(model).values()}),
            "lemoe_devices": sorted({str(v.device) for v in lemoe_tensors(model).values()}),
        }

    @section("generate_vs_teacher_forced")
    def _():
        model = box["model"]
        rows = []
        for prompt in [FACTS[0][0], FACTS[3][0], FACTS[5][2], GENERIC]:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            n = enc.input_ids.shape[1]
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=8,
                    min_new_tokens=8,
                    do_sample=False,
                    pad_token_id=0,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                sequence = out.sequences
                cached = torch.stack(out.logits, dim=1)[0].float()  # (new, vocab)
                forced = model(input_ids=sequence, use_cache=False).logits[0, n - 1 : -1].float()
            generated = sequence[0, n:]
            rows.append(
                {
                    "prompt": prompt,
                    "generated": tokenizer.decode(generated),
                    "generated_ids": generated.tolist(),
                    "max_abs_logit_diff": float((cached - forced).abs().max()),
                    "logit_scale": float(forced.abs().max()),
                    "tokens_equal": bool(torch.equal(forced.argmax(-1), generated)),
                    "cached_argmax_equal": bool(torch.equal(cached.argmax(-1), generated)),
                }
            )
        return {
            "prompts": rows,
            "all_tokens_equal": all(r["tokens_equal"] for r in rows),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        }

    @section("save_reload")
    def _():
        model = box["model"]
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            fresh = build_base(config, device, dtype, state)
            reloaded = PeftModel.from_pretrained(fresh, folder).eval()
        ours, theirs = lemoe_tensors(model), lemoe_tensors(reloaded)
        mismatched = [
            k
            for k in ours
            if k not in theirs
            or ours[k].dtype != theirs[k].dtype
            or ours[k].shape != theirs[k].shape
            or ours[k].device != theirs[k].device
            or not torch.equal(ours[k], theirs[k])
        ]
        batch = tokenizer([f[0] for f in FACTS] + [GENERIC], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            a = model(**batch).logits
            b = reloaded(**batch).logits
        del reloaded, fresh
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {
            "adapter_folder_bytes": size,
            "lemoe_tensors": len(ours),
            "missing_in_reload": sorted(set(ours) - set(theirs)),
            "extra_in_reload": sorted(set(theirs) - set(ours)),
            "mismatched": mismatched,
            "tensors_bit_exact": not mismatched and set(ours) == set(theirs),
            "logits_bit_exact": bool(torch.equal(a, b)),
            "logits_max_abs_diff": float((a.float() - b.float()).abs().max()),
        }

    @section("latency")
    def _():
        model = box["model"]
        tuner = model.base_model
        layers = tuner.lemoe_layers()
        cfg = model.peft_config["default"]
        t0 = time.perf_counter()
        new_experts = args.experts - cfg.num_experts
        new_anchors = args.anchors - cfg.num_anchors
        generator = torch.Generator(device="cpu").manual_seed(0)
        per = [new_anchors // new_experts + (i < new_anchors % new_experts) for i in range(new_experts)]
        with torch.no_grad():
            for count in per:
                expert = tuner.add_expert()
                keys = {}
                for name, layer in layers.items():
                    width = layer.lemoe_keys["default"].shape[1]
                    k = torch.randn(count, width, generator=generator)
                    keys[name] = torch.nn.functional.normalize(k, dim=-1).to(device)
                tuner.add_anchors(expert, keys)
        sync(device)
        grow_s = time.perf_counter() - t0
        adapter = lemoe_tensors(model)
        adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
        plain = build_base(config, device, dtype, state)
        generic = tokenizer(" ".join(CALIBRATION), return_tensors="pt").input_ids
        generic = generic.repeat(1, args.tokens // generic.shape[1] + 1)[:, : args.tokens].to(device)
        edited = tokenizer(" ".join([FACTS[0][0]] * args.tokens), return_tensors="pt").input_ids
        edited = edited[:, : args.tokens].to(device)

        def timed(m, ids) -> float:
            sync(device)
            t = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            sync(device)
            return time.perf_counter() - t

        rows = []
        with torch.no_grad():
            for label, ids in (("generic text", generic), ("edited prompt", edited)):
                for _ in range(5):
                    timed(plain, ids), timed(model, ids)
                base_t, lemoe_t = [], []
                for _ in range(args.rounds):
                    base_t.append(timed(plain, ids))
                    lemoe_t.append(timed(model, ids))
                rows.append(
                    {
                        "input": label,
                        "tokens": ids.shape[1],
                        "base_ms": round(1000 * median(base_t), 3),
                        "lemoe_ms": round(1000 * median(lemoe_t), 3),
                        "ratio": round(median(lemoe_t) / median(base_t), 3),
                        "base_ms_min": round(1000 * min(base_t), 3),
                        "lemoe_ms_min": round(1000 * min(lemoe_t), 3),
                    }
                )
        del plain
        return {
            "experts": cfg.num_experts,
            "anchors": cfg.num_anchors,
            "grow_seconds": round(grow_s, 2),
            "adapter_bytes": adapter_bytes,
            "adapter_mib": round(adapter_bytes / 2**20, 1),
            "rounds": args.rounds,
            "rows": rows,
        }

    if device.startswith("cuda"):
        result["peak_cuda_gib"] = peak_gib(device)  # since the last reset (the latency section)
        result["peak_cuda_gib_overall"] = max(v for v in result["section_peak_gib"].values() if v is not None)
        result["cuda_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    result["ok"] = not result["errors"]
    print(write())


if __name__ == "__main__":
    main()
