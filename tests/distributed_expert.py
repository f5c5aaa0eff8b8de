"""Run by tests/test_training_api.py with `torchrun --standalone --nproc_per_node 2`: every process opens the same
expert, Trainer trains it with the data split across the processes, and each process saves its expert weights."""

import sys
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from lemoe_peft import EditCollator, EditDataset, LEMoEConfig, LEMoEEditor
from tests.helpers import tiny_model, tiny_tokenizer
from tests.test_editor import CALIBRATION, REQUESTS

out = Path(sys.argv[1])
model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
editor = LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION)
editor.open_expert(REQUESTS[:4])
arguments = TrainingArguments(
    output_dir=str(out / "trainer"),
    max_steps=6,
    per_device_train_batch_size=2,
    learning_rate=3e-2,
    report_to=[],
    save_strategy="no",
    logging_strategy="no",
    use_cpu=True,
)
dataset, collator = EditDataset(REQUESTS[:4], editor.tokenizer), EditCollator(editor.tokenizer)
trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
trainer.train()
editor.close_expert()
layer = next(iter(model.base_model.lemoe_layers().values()))
weights = {
    name: tensor.detach().contiguous() for name, tensor in zip("AB", layer.newest_expert("default"), strict=True)
}
save_file(weights, str(out / f"rank{trainer.args.process_index}-of-{trainer.args.world_size}.safetensors"))
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # an orderly shutdown: gloo aborts ("terminate called ...") without it
