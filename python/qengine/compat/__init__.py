"""Import/export of other libraries' layouts (bitsandbytes)."""

from .bnb import from_bnb_state_dict, to_bnb_state_dict

__all__ = ["from_bnb_state_dict", "to_bnb_state_dict"]
