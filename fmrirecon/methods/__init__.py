"""Reconstruction methods and their registry: ``get_method(name) -> ReconMethod subclass``.

Each method lives in its own folder (STYLE.md §1) and is imported only when asked for, so a method whose
dependencies are missing does not break the others.
"""

from __future__ import annotations

import importlib

from fmrirecon.errors import ConfigError
from fmrirecon.methods.base import ReconMethod

__all__ = ["ReconMethod", "available_methods", "get_method", "register_method"]

# name -> module that defines a ReconMethod subclass whose ``name`` is that name
_REGISTRY: dict[str, str] = {
    "ridge": "fmrirecon.methods.ridge",
    "neuraldiffuser": "fmrirecon.methods.neuraldiffuser",
}


def register_method(name: str, module: str) -> None:
    """Register (or re-point) ``name`` to the module defining its ReconMethod subclass."""
    _REGISTRY[name] = module


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[ReconMethod]:
    """The ReconMethod subclass registered as ``name``.

    Raises:
        ConfigError: unknown name, or its module cannot be imported / defines no such method.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; expected one of {available_methods()}")
    module_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"method '{name}' is registered but its module {module_name} cannot be imported: {err}"
        ) from err
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, ReconMethod)
            and value is not ReconMethod
            and value.name == name
        ):
            return value
    raise ConfigError(
        f"method '{name}': module {module_name} defines no ReconMethod subclass with "
        f"name = '{name}' (not implemented yet?)"
    )
