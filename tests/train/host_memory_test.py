"""jaxlab.train.host_memory: the trim runs after long XLA compiles only, and is hooked once."""

import ctypes
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxlab.train import host_memory


@pytest.fixture
def trims(monkeypatch):
    """Counts the trims instead of calling the C library."""
    calls = []
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    return calls


def test_jax_records_the_compile_event_the_hook_listens_to():
    events = []

    def listen(event, duration, **_):
        events.append((event, duration))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # A new function misses jax's in-memory cache; a persistent-cache hit records it too.
        jax.jit(lambda x: jnp.sin(x) * 2.5)(jnp.arange(7.0)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    durations = [d for e, d in events if e == host_memory.BACKEND_COMPILE_EVENT]
    assert durations and all(d >= 0 for d in durations), events


def test_only_compiles_of_at_least_the_threshold_are_followed_by_a_trim(trims):
    minimum = host_memory.MIN_COMPILE_SECONDS
    host_memory._on_event(host_memory.BACKEND_COMPILE_EVENT, minimum * 0.5)
    host_memory._on_event("/jax/core/compile/jaxpr_trace_duration", minimum * 10)
    assert trims == []
    host_memory._on_event(host_memory.BACKEND_COMPILE_EVENT, minimum)
    host_memory._on_event(host_memory.BACKEND_COMPILE_EVENT, minimum * 3, fun_name="step")
    assert len(trims) == 2


def test_hooked_once_however_often_it_is_asked(monkeypatch, trims):
    registered = []
    monkeypatch.setattr(host_memory, "_hooked", False)
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
    assert host_memory.trim_after_compiles() is True
    assert host_memory.trim_after_compiles() is True
    assert registered == [host_memory._on_event]


def test_without_malloc_trim_nothing_is_hooked(monkeypatch):
    registered = []
    monkeypatch.setattr(host_memory, "_hooked", False)
    monkeypatch.setattr(host_memory, "malloc_trim", lambda: None)
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
    assert host_memory.trim_after_compiles() is False
    assert registered == []
    host_memory._on_event(host_memory.BACKEND_COMPILE_EVENT, 10.0)  # and no trim is attempted


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_malloc_trim_is_found_and_runs():
    trim = host_memory.malloc_trim()
    if trim is None:
        pytest.skip("this Linux's C library has no malloc_trim (not glibc)")
    assert trim() in (0, 1)


def test_a_c_library_without_malloc_trim_gives_none(monkeypatch):
    class NoTrim:
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoTrim())
    host_memory.malloc_trim.cache_clear()
    try:
        assert host_memory.malloc_trim() is None
    finally:
        host_memory.malloc_trim.cache_clear()
