"""Import/export of other libraries' layouts (bitsandbytes) and PEFT glue (compat.peft, imported on use)."""

from . import bnb
from .bnb import bnb_model_state_dict, from_bnb_state_dict, load_bnb_model_state_dict, to_bnb_state_dict

__all__ = ["bnb", "bnb_model_state_dict", "from_bnb_state_dict", "load_bnb_model_state_dict",
           "to_bnb_state_dict"]


def __getattr__(name):
    # qengine.compat.peft imports peft when it is installed: loaded on first use, not with qengine.
    if name == "peft":
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qengine.compat' has no attribute {name!r}")
