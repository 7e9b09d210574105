"""Registers qengine with transformers on first use without importing transformers at
`import qengine`: when transformers.modeling_utils (what every from_pretrained runs) finishes
importing, qengine.hf is imported, which registers the "qengine" quantization method."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

_TRIGGER = "transformers.modeling_utils"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.__loader__ = self.inner  # hand the module back to its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        _register()

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...: the real loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec, then wrap its loader
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def _register() -> None:
    try:
        import qengine.hf  # noqa: F401  (registers QEngineConfig)
    except Exception as e:  # a broken registration must not break transformers itself
        logging.getLogger("qengine").warning("qengine: could not register with transformers: %r", e)


def install() -> None:
    """Registers now if transformers is loaded, else once it is (nothing if it is not installed)."""
    if _TRIGGER in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
