"""Reading pickles without running code: only globals named in an allow-list are rebuilt.

Unpickling an arbitrary file can call any function (``os.system`` in a ``__reduce__``). Every
reference to a class or function (``GLOBAL``/``STACK_GLOBAL`` and extension codes) goes
through :meth:`RestrictedUnpickler.find_class`, which answers only from its allow-list and
refuses anything else before it runs. Containers, strings and numbers need no global and
always load.

Public API:
    RestrictedUnpickler(file, *, allowed={}, holds=...)    (pickle.Unpickler)
    NUMPY_ARRAY_GLOBALS                                     (the allow-list of numpy arrays)
"""

from __future__ import annotations

import codecs
import collections
import importlib
import pickle
from collections.abc import Mapping
from typing import IO, Any

import numpy as np


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that rebuilds only the globals in ``allowed``.

    Args:
        file: the open binary file; its ``name`` is quoted in errors.
        allowed: ``(module, name)`` -> the object to use for that global. Empty: no class and
            no function at all.
        holds: what the file may contain, for the error message (``"the refs pickle may only
            hold dicts, lists, strings and numbers"``).
        **kwargs: ``pickle.Unpickler``'s (``encoding``, ...).

    Raises (from ``load``):
        pickle.UnpicklingError: a global outside ``allowed`` (naming it and the file), or a
            persistent id.
    """

    def __init__(self, file: IO[bytes], *, allowed: Mapping[tuple[str, str], Any] | None = None,
                 holds: str = "it may only hold containers, strings and numbers",
                 **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = dict(allowed or {})
        self._holds = holds
        self._source = getattr(file, "name", "the pickle")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from {self._source}: {self._holds}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing a persistent id in {self._source}")


def _numpy_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2) or ``numpy.core.<name>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r} "
                                     "(pickled bytes are latin-1)")
    return text.encode("latin-1")


_MULTIARRAY = _numpy_module("multiarray")
_NUMERIC = _numpy_module("numeric")

#: What numpy arrays (any numeric dtype, any pickle protocol, numpy 1 or 2) and ordered
#: dicts of them need. Object arrays still load (their items are unpickled with the same
#: allow-list); refuse them afterwards where only numbers are expected.
NUMPY_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _MULTIARRAY._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _MULTIARRAY.scalar
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _NUMERIC._frombuffer
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}
