"""Import/export of other libraries' layouts (bitsandbytes) and PEFT glue (compat.peft, imported on use)."""

from .bnb import bnb_model_state_dict, from_bnb_state_dict, load_bnb_model_state_dict, to_bnb_state_dict

__all__ = ["bnb_model_state_dict", "from_bnb_state_dict", "load_bnb_model_state_dict", "to_bnb_state_dict"]
