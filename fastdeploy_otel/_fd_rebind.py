"""Replacing a library's functions in place, on import or after it, and undoing it exactly.

``from fastdeploy.trace.trace_logger import print as trace_print`` copies the function into the
importing module, so replacing the module attribute alone misses such call sites.  ``Patcher``
therefore also rebinds every module global that holds the original, and reverses both on restore.
``ImportHook`` (a ``sys.meta_path`` finder) runs a callback right after a watched module executes,
before anyone can import names from it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

_MISSING = object()
_OWN_PREFIX = __name__.rpartition(".")[0]  # our own modules hold the replacements: never rebound


def rebind_everywhere(swaps: Mapping[int, tuple[Any, Any]]) -> int:
    """Point every module global that is one of the `swaps` originals (by id) at its replacement."""
    count = 0
    for name, module in list(sys.modules.items()):
        if name == _OWN_PREFIX or name.startswith(_OWN_PREFIX + "."):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        try:
            for key, value in list(namespace.items()):
                swap = swaps.get(id(value))
                if swap is not None and value is swap[0]:
                    namespace[key] = swap[1]
                    count += 1
        except Exception:  # an odd module object: leave it alone
            continue
    return count


class Patcher:
    """Attribute replacements that remember what they replaced."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    def replace(self, owner: Any, name: str, new: Any) -> None:
        """Set ``owner.name = new`` (a module or a class) and rebind module-level copies of the old value."""
        with self._lock:
            old = owner.__dict__.get(name, _MISSING)
            if old is new:
                return
            setattr(owner, name, new)
            self._undo.append((owner, name, old))
            if callable(old) and isinstance(owner, ModuleType):
                rebind_everywhere({id(old): (old, new)})

    def restore(self) -> None:
        """Put every original back, copies included, newest first."""
        with self._lock:
            undo, self._undo = self._undo, []
        swaps: dict[int, tuple[Any, Any]] = {}
        for owner, name, old in reversed(undo):
            current = owner.__dict__.get(name)
            if old is _MISSING:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, old)
            if callable(old) and isinstance(owner, ModuleType) and current is not None:
                swaps[id(current)] = (current, old)
        if swaps:
            rebind_everywhere(swaps)

    def __len__(self) -> int:
        return len(self._undo)


class _PatchingLoader(importlib.abc.Loader):
    """The real loader, then the callback on the fresh module."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... as the real loader has them
        return getattr(self._loader, name)


class ImportHook(importlib.abc.MetaPathFinder):
    """Calls ``callbacks[name](module)`` right after a watched module is imported."""

    def __init__(self, callbacks: Mapping[str, Callable[[ModuleType], None]]) -> None:
        self._callbacks = dict(callbacks)
        self._local = threading.local()

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        callback = self._callbacks.get(fullname)
        if callback is None or getattr(self._local, "busy", False):
            return None
        self._local.busy = True  # find the real spec with the other finders, not ourselves
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._local.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, callback)
        return spec

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)
