"""The one place where LEMoE touches PEFT's internals: adding ``PeftType.LEMOE`` and registering the tuner.

PEFT (>= 0.15) offers :func:`peft.utils.register_peft_method`, but it only accepts names that already exist in the
``PeftType`` enum, and enums cannot be extended through a public API. We therefore add the member by hand (name ==
value, so that plain JSON strings such as ``"LEMOE"`` look it up too) and then call the public registration function.
Both steps are idempotent, so importing :mod:`lemoe_peft` twice (or reloading it) is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "LEMOE"


def ensure_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    return member


LEMOE = ensure_peft_type()


def register() -> None:
    """Register ``LEMoEConfig``/``LEMoEModel`` with PEFT under the name ``"lemoe"`` (no-op if already done)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import LEMoEConfig
    from .model import LEMoEModel

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(LEMOE)
    if registered is not None:
        if registered.__qualname__ != LEMoEModel.__qualname__:
            raise RuntimeError(f"PeftType.LEMOE is already registered to {registered!r}, not to lemoe_peft.")
        return
    register_peft_method(name="lemoe", config_cls=LEMoEConfig, model_cls=LEMoEModel, prefix=LEMoEModel.prefix)
