"""Registers qengine with Hugging Face libraries on first use without importing them at
`import qengine`: when transformers.modeling_utils (what every from_pretrained runs) finishes
importing, qengine.hf is imported, which registers the "qengine" quantization method; when peft
finishes importing, qengine.compat.peft.install() makes PEFT's LoRA take QuantLinear layers
(so a plain LoraConfig works, as with bitsandbytes). Either library already imported: now."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys


def _register_transformers() -> None:
    import qengine.hf  # noqa: F401  (registers QEngineConfig)


def _register_peft() -> None:
    import qengine.compat.peft  # noqa: F401  (installs qengine's LoRA dispatch when imported)


# module whose import completes -> (registration, what a user does instead if it fails)
_HOOKS = {
    "transformers.modeling_utils": (_register_transformers, "transformers", "import qengine.hf"),
    "peft": (_register_peft, "peft", "call qengine.compat.peft.register(config) on each LoraConfig"),
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, trigger, finder):
        self.inner, self.trigger, self.finder = inner, trigger, finder

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        module.__loader__ = self.inner  # hand the module back to its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        self.finder.done(self.trigger)
        _register(self.trigger)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...: the real loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of each pending trigger module; a trigger is done once its module has
    executed (not when it is only looked up: transformers' is_peft_available() calls
    importlib.util.find_spec("peft") without importing it), and the finder leaves
    sys.meta_path when none is pending."""

    def __init__(self, pending):
        self.pending = set(pending)

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        for finder in list(sys.meta_path):  # the spec the other finders give, its loader wrapped
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, name, self)
                return spec
        return None

    def done(self, trigger: str) -> None:
        self.pending.discard(trigger)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def _register(trigger: str) -> None:
    register, library, instead = _HOOKS[trigger]
    try:
        register()
    except Exception as e:  # a broken registration must not break the library itself
        logging.getLogger("qengine").warning("qengine: could not register with %s (%r); %s", library, e, instead)


def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def install() -> None:
    """Registers now with each library already loaded, else once it is (nothing for one that is
    not installed)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    pending = []
    for trigger in _HOOKS:
        if trigger in sys.modules:
            _register(trigger)
        elif _installed(trigger.split(".")[0]):
            pending.append(trigger)
    if pending:
        sys.meta_path.insert(0, _Finder(pending))
