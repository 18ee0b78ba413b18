"""Exception stores: where a snapshot keeps its COW chunks and their mapping.

`create_store` / `open_store` pick the class from the dm table's store
type (`StoreType`): "P" and "PO" are persistent (`PersistentStore`), "N"
is transient (`TransientStore`).

The names in `_EXPORTS` are imported on first use: the stores need trio,
msgpack and xxhash, and a module that needs only the store's errors or
types (the dm core's package, whose own import must stay light) must not
pay for them.
"""

from __future__ import annotations

import importlib

from .types import StoreType as StoreType

# public name -> the module that defines it
_EXPORTS = {
    "SECTOR": "base",
    "ExceptionRun": "base",
    "ExceptionStore": "base",
    "PersistentStore": "persistent",
    "TransientStore": "transient",
    "store_class": "_factory",
    "create_store": "_factory",
    "open_store": "_factory",
    "remove_store": "_factory",
    "rename_files": "renames",
}

__all__ = ["StoreType", *_EXPORTS]


def __getattr__(name: str) -> object:
    """Import the module defining `name` (PEP 562) and keep the value here."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
