"""What a saved qengine `quantization_config` must hold, checked before anything loads: the
keys, a known format, a per-module plan, the calibration record, and a qengine_version of this
release series."""

from __future__ import annotations

from .._version import __version__
from ..formats import get_format

QUANT_METHOD = "qengine"
# How a calibrated checkpoint was made (recorded, never needed to load): key -> accepted types.
CALIBRATION_KEYS = {"damp": (int, float), "act_order": (bool,), "calibration_tokens": (int,), "sequential": (bool,)}


def _series(version: str) -> tuple:
    """The release series whose checkpoints share one layout: (major, minor) for 0.x, (major,) after."""
    parts = tuple(int(p) for p in version.split(".")[:2])
    return parts if parts[0] == 0 else parts[:1]


def check_quantization_config(qc: dict, where: str) -> None:
    """Checks a saved qengine `quantization_config`: the keys the loader needs, a format this
    qengine knows, and a qengine_version of this release series (a checkpoint from another
    series may use a layout this version cannot read). ValueError naming the problem."""
    for key in ("format", "blocksize", "double_quant", "modules", "qengine_version"):
        if key not in qc or (key in ("modules", "qengine_version") and qc[key] is None):
            raise ValueError(f"{where}: quantization_config lacks {key!r} (not a qengine checkpoint config)")
    try:
        get_format(qc["format"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: quantization_config names an unknown format ({e}); register it with "
                         "qengine.register_format before loading") from None
    if qc.get("plan") is not None:
        check_plan_entries(qc["plan"], where)
    if not isinstance(qc.get("method", "rtn"), str):
        raise ValueError(f"{where}: quantization_config's method must be a string, got {qc['method']!r}")
    for key, types in CALIBRATION_KEYS.items():
        v = qc.get(key)
        if v is not None and (not isinstance(v, types) or (bool not in types and isinstance(v, bool))):
            raise ValueError(f"{where}: quantization_config's {key} must be {' or '.join(t.__name__ for t in types)}, "
                             f"got {v!r}")
    version = qc["qengine_version"]
    try:
        theirs = _series(str(version))
    except ValueError:
        raise ValueError(f"{where}: quantization_config has an unreadable qengine_version {version!r}") from None
    if theirs != _series(__version__):
        raise ValueError(f"{where}: written by qengine {version}, whose checkpoint layout this qengine {__version__} "
                         f"does not read (it reads {'.'.join(map(str, _series(__version__)))}.x checkpoints)")


def check_plan_entries(plan: object, where: str) -> dict:
    """A quantization_config's per-module "plan": checked ({module: entry dict or "float16"})."""
    if not isinstance(plan, dict) or not plan:
        raise ValueError(f"{where}: quantization_config's plan must be a non-empty dict of module entries")
    for name, e in plan.items():
        if e == "float16":
            continue
        if not isinstance(e, dict) or "format" not in e:
            raise ValueError(f"{where}: quantization_config's plan entry {name!r} must be 'float16' or a dict with "
                             f"format, blocksize, double_quant, method; got {e!r}")
        try:
            get_format(e["format"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: plan entry {name!r}: {err}") from None
    return plan
