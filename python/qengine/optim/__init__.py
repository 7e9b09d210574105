"""Paged AdamW optimizers with 32-bit or blockwise 8-bit states and one fused native update.

    >>> opt = qengine.optim.PagedAdamW8bit(model.parameters(), lr=2e-4)
    >>> opt = qengine.optim.PagedAdamW(model.parameters(), budget_bytes=1 << 30)  # spill beyond 1 GiB
"""

from .adamw import PagedAdamW, PagedAdamW8bit
from .paging import SpillError

__all__ = ["PagedAdamW", "PagedAdamW8bit", "SpillError"]
