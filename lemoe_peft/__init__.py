"""lemoe-peft: lifelong model editing with LEMoE (Wang & Li, EMNLP 2024) as a PEFT tuner.

Importing this package registers the PEFT type ``LEMOE``; do it before ``PeftModel.from_pretrained`` or
``AutoPeftModelForCausalLM.from_pretrained`` on a LEMoE adapter.
"""

from .config import LEMoEConfig
from .layer import LEMoELayer, LEMoELinear
from .model import LEMoEModel
from .registration import register

register()

from .data import EditCollator, EditDataset  # noqa: E402
from .editor import EditReport, LEMoEEditor  # noqa: E402  (after registration: the editor uses the tuner)
from .evaluation import evaluate_edits, locality_generation_reference, locality_reference  # noqa: E402
from .generation import GenerationSettings  # noqa: E402
from .loaders import load_edit_requests  # noqa: E402
from .requests import EditRequest, Probe, RequestError  # noqa: E402
from .routing import chat_markers, token_marks  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EditCollator",
    "EditDataset",
    "EditReport",
    "EditRequest",
    "GenerationSettings",
    "LEMoEConfig",
    "LEMoEEditor",
    "LEMoELayer",
    "LEMoELinear",
    "LEMoEModel",
    "Probe",
    "RequestError",
    "chat_markers",
    "evaluate_edits",
    "load_edit_requests",
    "locality_generation_reference",
    "locality_reference",
    "token_marks",
    "__version__",
]
