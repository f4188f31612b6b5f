"""The shared name registry: lookups, errors that name the field, no silent overwrite."""

import pytest

from jaxlab.registry import Registry


def test_register_and_get_round_trip_sorted_names():
    registry = Registry("widget", field="config.widget")
    first, second = object(), object()
    assert registry.register("b", first) is first
    registry.register("a", second)
    assert registry.get("b") is first and registry.get("a") is second
    assert registry.names() == ("a", "b") and list(registry) == ["a", "b"]
    assert "a" in registry and "c" not in registry and len(registry) == 2


def test_unknown_name_error_names_field_choices_and_value():
    registry = Registry("widget", field="config.widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match=r"config.widget must be one of \('a',\), got 'zz'"):
        registry.get("zz")


def test_duplicate_needs_replace():
    registry = Registry("widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", 2)
    registry.register("a", 3, replace=True)
    assert registry.get("a") == 3


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_name_rejected(name):
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("widget").register(name, 1)
