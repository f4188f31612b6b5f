"""The objective registry: built-in and method objectives by name, registration, errors."""

import pytest

import jaxlab.distill  # noqa: F401  (registers its objectives)
import jaxlab.mixing  # noqa: F401  (registers its objectives)
from jaxlab import objectives
from jaxlab.registry import Registry


def test_methods_register_their_objectives():
    names = objectives.available_objectives()
    assert {"next_token", "doge", "doremi"} <= set(names)
    assert names == objectives.OBJECTIVES.names()
    assert objectives.get_objective("doremi").frozen_models(
        _Config(mixer=_Config(reference_workdir="/runs/ref"))
    ) == {"reference": "run:/runs/ref"}


class _Config(dict):
    __getattr__ = dict.__getitem__


def test_register_get_and_errors(monkeypatch):
    fresh = Registry("objective", field="config.objective.name")
    monkeypatch.setattr(objectives, "OBJECTIVES", fresh)

    def build(context):
        return objectives.Objective(lambda *args: args)

    def refuse(config):
        raise ValueError("config.x: no")

    objectives.register_objective("mine", build, validate=refuse)
    spec = objectives.get_objective("mine")
    assert spec.build is build and spec.frozen_models(None) == {}
    with pytest.raises(ValueError, match="config.x: no"):
        spec.validate(None)
    with pytest.raises(ValueError, match="'mine' is already registered"):
        objectives.register_objective("mine", build)
    objectives.register_objective("mine", build, replace=True)
    assert objectives.get_objective("mine").validate(None) is None
    with pytest.raises(
        ValueError, match=r"config.objective.name must be one of \('mine',\), got 'x'"
    ):
        objectives.get_objective("x")
