"""The ``lemoe`` command: edit facts into a model, evaluate an adapter, inspect an adapter."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from .editor import EditorSettings, LEMoEEditor
from .evaluation import evaluate_edits
from .loaders import FORMATS, load_edit_requests
from .teacher_forcing import has_chat_template

METRIC_LABELS = {
    "rewrite": "Reliability",
    "rephrase": "Generality",
    "locality": "Locality",
    "locality_other": "Loc. (other)",  # locality probes that ask none of the edited facts
    "portability": "Portability",
}


DTYPES = ("float32", "bfloat16", "float16")


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, help="model folder, .gguf file, or 'smollm2'")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the base model")
    parser.add_argument("--device", help="device of the model, e.g. cpu, cuda, cuda:1 (not given: cpu)")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="edit requests: .json/.jsonl in a known format")
    parser.add_argument("--format", choices=sorted(FORMATS), help="data format (not given: detected)")
    parser.add_argument("--limit", type=int, help="use the first N requests")
    parser.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    parser.add_argument("--json", type=Path, help="also write the results (per case and means) to this file")
    parser.add_argument(
        "--no-generation", action="store_true", help="skip the generation-based metrics (greedy generate())"
    )
    parser.add_argument(
        "--ask-in-chat", action="store_true", help="score every prompt sent through the tokenizer's chat template"
    )


def build_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    from . import __version__

    parser = argparse.ArgumentParser(prog="lemoe", description="Lifelong model editing with LEMoE adapters.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    shows_defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    settings = HfArgumentParser(EditorSettings, add_help=False)  # the editor's settings, with their help texts
    edit = commands.add_parser(
        "edit", parents=[settings], help="edit facts into a model and report Rel/Gen/Loc", **shows_defaults
    )
    _add_model_arguments(edit)
    edit.add_argument("--out", required=True, type=Path, help="adapter folder (resumed from if it exists)")
    _add_data_arguments(edit)
    edit.add_argument("--checkpoint-every", type=int, default=25, help="save the adapter every N batches")
    edit.add_argument("--no-eval", action="store_true", help="skip the evaluation after editing")

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter", **shows_defaults)
    _add_model_arguments(evaluate)
    evaluate.add_argument("--adapter", required=True, type=Path, help="LEMoE adapter folder")
    _add_data_arguments(evaluate)

    inspect = commands.add_parser(
        "inspect", help="describe an adapter; with --prompt, say which expert answers", **shows_defaults
    )
    inspect.add_argument("adapter", type=Path, help="LEMoE adapter folder")
    _add_model_arguments(inspect, required=False)
    inspect.add_argument("--prompt", help="a prompt to route (needs --model)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything is loaded (ValueError: one line, exit code 2)."""
    import torch

    problems = []
    if args.model is not None and args.model.lower() != "smollm2" and not Path(args.model).exists():
        problems.append(f"--model {args.model}: no such model folder or .gguf file (or use 'smollm2')")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        problems.append(f"--limit must be >= 1, got {args.limit}")
    if args.command in ("eval", "inspect") and not args.adapter.is_dir():
        problems.append(f"{args.adapter} is not an adapter folder")
    if args.command == "inspect" and args.prompt and not args.model:
        problems.append("--prompt needs --model (the base model it was made for)")
    if args.command == "edit":
        if args.out.exists() and not args.out.is_dir():
            problems.append(f"--out {args.out} is a file, not an adapter folder")
        if args.checkpoint_every < 1:
            problems.append(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        try:
            _editor_settings(args)
        except ValueError as error:
            problems.append(str(error).removeprefix("Invalid editor setting: ").rstrip("."))
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            problems.append(f"--device {args.device} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def _editor_settings(args: argparse.Namespace) -> EditorSettings:
    return EditorSettings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(EditorSettings)})


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if getattr(args, "ask_in_chat", False) and not has_chat_template(tokenizer):
        raise ValueError(f"--ask-in-chat needs a chat template, and the tokenizer of {args.model} has none")
    return model, tokenizer


def _print_table(title: str, results: dict[str, Any], extra: dict[str, str]) -> None:
    """Each metric teacher-forced (``<name>_acc``) and generated (``<name>_gen_acc``) side by side."""
    print(f"\n{title}")
    for name, label in METRIC_LABELS.items():
        if f"{name}_acc" in results:
            generated = f"   generated {results[f'{name}_gen_acc']:.3f}" if f"{name}_gen_acc" in results else ""
            print(f"  {label:<13} teacher-forced {results[f'{name}_acc']:.3f}{generated}")
    for label, value in extra.items():
        print(f"  {label:<13} {value}")


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        from .edit_log import write_json_atomic

        write_json_atomic(path, data)
        print(f"  results written to {path}")


def _edit(args: argparse.Namespace) -> None:
    from filelock import FileLock, Timeout
    from peft import get_peft_model

    from . import LEMoEConfig

    requests = load_edit_requests(args.data, args.format, args.limit, args.skip_invalid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(args.out.with_name(args.out.name + ".lock"))  # beside --out: checkpoints swap the folder itself
    try:
        held = lock.acquire(timeout=0)
    except Timeout:
        message = f"another `lemoe edit` is writing {args.out} (it holds {lock.lock_file}); wait for it to finish"
        raise ValueError(message) from None
    with held:
        base, tokenizer = _load(args)
        model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
        editor = LEMoEEditor(model, tokenizer, **dataclasses.asdict(_editor_settings(args)))
        report = editor.edit(requests, checkpoint_dir=str(args.out), checkpoint_every=args.checkpoint_every)
    config = model.peft_config["default"]
    print(
        f"Edited {report.num_edits} requests in {len(report.batches)} new experts "
        f"({report.skipped} already in {args.out}); the adapter holds {config.num_experts} experts."
    )
    extra = {"edit time": f"{report.seconds:.1f} s ({report.seconds_per_edit:.2f} s/edit)", "adapter": str(args.out)}
    if args.no_eval:
        return
    protocol = {
        "model": args.model,
        "data": f"{args.data} (first {len(requests)})",
        **{key: value for key, value in vars(editor.settings).items()},
    }
    title = f"LEMoE on {args.model}: {len(requests)} edits, evaluated after the whole stream"
    _score(args, model, tokenizer, requests, protocol, title, extra)


def _evaluate(args: argparse.Namespace) -> None:
    from peft import PeftModel

    requests = load_edit_requests(args.data, args.format, args.limit, args.skip_invalid)
    base, tokenizer = _load(args)
    model = PeftModel.from_pretrained(base, str(args.adapter))
    protocol = {"model": args.model, "adapter": str(args.adapter), "data": f"{args.data} (first {len(requests)})"}
    _score(args, model, tokenizer, requests, protocol, f"{args.adapter} on {args.model}: {len(requests)} requests")


def _score(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    requests: list,
    protocol: dict[str, Any],
    title: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Evaluate as the command line asks, print the table and write the JSON file if asked."""
    results = evaluate_edits(
        model,
        tokenizer,
        requests,
        protocol=protocol,
        generation=not args.no_generation,
        progress=True,
        chat=args.ask_in_chat,
    )
    _print_table(title, results, extra or {})
    _write_json(args.json, results)


def _inspect(args: argparse.Namespace) -> None:
    from . import LEMoEConfig
    from .inspection import describe_adapter, which_expert

    summary = describe_adapter(LEMoEConfig.from_pretrained(str(args.adapter)))
    print(f"{args.adapter}: LEMoE adapter for {summary['base_model']}")
    print(f"  beside {', '.join(summary['target_modules'])} in layers {summary['layers']}")
    print(f"  {summary['num_experts']} experts, {summary['num_anchors']} anchor keys, {summary['num_edits']} edits")
    for expert in summary["experts"]:
        print(f"  expert {expert['expert']:>4}: {expert['edits']} edits, e.g. {'; '.join(expert['examples'][:2])}")
    if args.prompt:
        from peft import PeftModel

        base, tokenizer = _load(args)
        result = which_expert(PeftModel.from_pretrained(base, str(args.adapter)), tokenizer, args.prompt)
        print(f"\n{args.prompt!r}:")
        for layer, route in result["layers"].items():
            target = (
                f"expert {route['expert']} (anchor score {route['score']:.3f})"
                if route["expert"] is not None
                else ("no expert: the base model answers")
            )
            print(f"  {layer}: {target}")
        if result["edited_in_expert"] is not None:
            print(f"  this exact prompt was edited into expert {result['edited_in_expert']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        _check_arguments(args)
        {"edit": _edit, "eval": _evaluate, "inspect": _inspect}[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"lemoe {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
