"""Host memory after XLA compiles: the compiler's freed heap goes back to the operating system.

Compiling a large program (XLA, and LLVM on CPU) allocates and frees hundreds of MiB of small
blocks. glibc keeps freed blocks in its arenas, so the resident set stays that much higher for
the rest of the run, and the buffers the compiled program then allocates (large, so fresh pages)
come on top. ``malloc_trim(0)`` returns the free pages. Measured on lm_tiny's train step (2-core
CPU, ``jax.jit(...).lower().compile()`` then two steps): the compile left RSS ~100 MiB higher;
a trim after it took ~50 ms and lowered RSS by ~170 MiB (the compile's garbage and what tracing,
lowering and initialisation had left before it), and the peak RSS over the first steps went from
~820 to ~665 MiB.

:func:`trim_after_compiles` hooks this onto jax's backend-compile event (``jax.monitoring``), for
compiles (or persistent-cache reads) of at least :data:`MIN_COMPILE_SECONDS`: smaller ones leave
little to return, and on lm_tiny the trim cost ~5% of the compile it followed. The hook is
process-wide and stays (``jax.monitoring.clear_event_listeners`` removes it, after which
:func:`trim_after_compiles` would not hook it again). Without glibc (macOS, musl, Windows) it does
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable

import jax
from absl import logging

# jax records this event (seconds) when an XLA compile (or a persistent-cache read) finishes,
# before the executable first runs.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MIN_COMPILE_SECONDS = 1.0

_lock = threading.Lock()
_hooked = False


@functools.lru_cache(maxsize=1)
def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a function (returns 1 if memory was released), or None
    where the C library loaded in this process has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: its C library's
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _on_event(event: str, duration: float, **_) -> None:
    # jax calls listeners without a guard, also when the compile failed: never raise here.
    try:
        if event == BACKEND_COMPILE_EVENT and duration >= MIN_COMPILE_SECONDS:
            trim = malloc_trim()
            if trim is not None:
                trim()
    except Exception:  # noqa: BLE001
        logging.exception("jaxlab.train.host_memory: returning freed memory failed")


def trim_after_compiles() -> bool:
    """From now on in this process, return freed heap memory to the operating system after each
    XLA compile of at least :data:`MIN_COMPILE_SECONDS`. Calling it again changes nothing.

    Returns:
      Whether it is active: False where the C library has no ``malloc_trim``.
    """
    global _hooked
    if malloc_trim() is None:
        return False
    with _lock:
        if not _hooked:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _hooked = True
    return True
