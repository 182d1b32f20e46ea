"""Import torchvision's model zoo even when its compiled ops cannot load.

The torchvision wheel on the package index is built against CUDA torch; next to a CPU-only torch its
``_C`` extension fails to load, and torchvision >= 0.28 then fails at import time while registering fake
kernels for the detection ops (``torchvision::nms`` ...). The evaluation suite needs only the
classification models and ``feature_extraction``, which are pure Python, so on that failure the two
registration modules are replaced by empty ones and the import is retried. Detection ops stay unavailable
(calling them raises torchvision's own error).
"""

from __future__ import annotations

import sys
import types

_REGISTRATION_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> types.ModuleType:
    """Return the ``torchvision`` module, working around a CUDA-only ``_C`` next to a CPU torch."""
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _REGISTRATION_MODULES:
            sys.modules[name] = types.ModuleType(name)
        import torchvision
    return torchvision
