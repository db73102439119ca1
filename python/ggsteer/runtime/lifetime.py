"""One lifetime style for the native objects ggsteer allocates itself (batches, samplers).

Each is freed exactly once: by `close()`, by leaving its `with` block, or when Python collects
it (`weakref.finalize`, which also runs at interpreter exit). Nothing needs a manual close to
avoid a leak; `close()` and `with` only make the moment explicit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any


class NativeHandle:
    """Base for a Python object that owns one native allocation (`own(free, handle)` once in __init__)."""

    _finalizer: weakref.finalize | None = None

    def own(self, free: Callable[[Any], Any], handle: Any) -> None:
        # the finalizer holds the handle, never self: holding self would keep it alive forever
        self._finalizer = weakref.finalize(self, free, handle)

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def require_open(self) -> None:
        """Raise instead of letting a closed object reach freed native memory."""
        if self.closed:
            raise ValueError(f"this {type(self).__name__} is closed")

    def close(self) -> None:
        """Free the native object now (later calls do nothing)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
