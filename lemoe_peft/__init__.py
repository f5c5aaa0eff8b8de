"""lemoe-peft: lifelong model editing with LEMoE (Wang & Li, EMNLP 2024) as a PEFT tuner.

Importing this package registers the PEFT type ``LEMOE``; do it before ``PeftModel.from_pretrained`` or
``AutoPeftModelForCausalLM.from_pretrained`` on a LEMoE adapter.
"""

from .config import LEMoEConfig
from .layer import LEMoELayer, LEMoELinear
from .model import LEMoEModel
from .registration import register

register()

__version__ = "0.1.0"

__all__ = ["LEMoEConfig", "LEMoELayer", "LEMoELinear", "LEMoEModel", "__version__"]
