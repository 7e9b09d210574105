"""The package version (the one place it is written) and the supported torch range, checked at import."""

from __future__ import annotations

import re

__version__ = "0.1.0"

# The distribution (what pip installs) is torch-qengine: "qengine" on PyPI is an unrelated
# project. The import name stays qengine.
DISTRIBUTION = "torch-qengine"

# torch releases this build supports: [TORCH_MIN, TORCH_BELOW). pyproject.toml declares the same
# range (tests/test_packaging.py keeps the two equal). The native module does not link libtorch,
# so the range is set by the torch.library API used in Python (custom_op, register_fake and
# register_autograd appeared in 2.4), not by a torch build.
TORCH_MIN = (2, 4)
TORCH_BELOW = (3, 0)


def torch_requirement() -> str:
    """The requirement string pyproject.toml declares, e.g. 'torch>=2.4,<3'."""
    below = ".".join(map(str, TORCH_BELOW[:1] if TORCH_BELOW[1] == 0 else TORCH_BELOW))
    return f"torch>={TORCH_MIN[0]}.{TORCH_MIN[1]},<{below}"


def check_torch_version(version: str) -> None:
    """Raises ImportError naming the installed and the supported torch when `version` (a
    torch.__version__ such as '2.13.0+cpu' or '2.15.0.dev20270101') is outside the range.
    Pre-releases count as their release: 2.4.0a0 is 2.4."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise ImportError(f"qengine cannot parse the installed torch version {version!r}; "
                          f"it supports {torch_requirement()}")
    found = (int(match.group(1)), int(match.group(2)))
    if not TORCH_MIN <= found < TORCH_BELOW:
        raise ImportError(f"qengine {__version__} supports {torch_requirement()}, but torch {version} is "
                          f"installed; install a supported torch (pip install '{torch_requirement()}') "
                          f"or a qengine release made for this torch")


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one optional extra ("hf", "test", ...) as this installation declares
    them (its metadata), so an install hint names this package's dependencies, never a
    same-named project on the index. Empty when the metadata cannot be read."""
    from importlib import metadata
    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    marker = re.compile(r"""\s*;\s*extra\s*==\s*['"]%s['"]\s*$""" % re.escape(extra))
    return [marker.sub("", r).replace(" ", "") for r in declared if marker.search(r)]


def install_hint(extra: str) -> str:
    """A pip command that installs what `extra` needs, e.g. for "hf":
    pip install 'transformers>=5.0' 'peft>=0.13' ... (the hf extra of torch-qengine)."""
    reqs = extra_requirements(extra)
    if not reqs:
        return f"pip install '{DISTRIBUTION}[{extra}]'"
    return "pip install " + " ".join(f"'{r}'" for r in reqs) + f" (the '{extra}' extra of {DISTRIBUTION})"


def check_torch() -> None:
    """Imports torch and checks its version, with an install hint when it is missing."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"qengine needs PyTorch ({torch_requirement()}), which is not importable: {e}. "
                          f"Install torch first (https://pytorch.org/get-started/), then qengine.") from e
    check_torch_version(torch.__version__)
