"""Data mixers as init/update state machines: DoGE and the DoReMi baseline."""

from jaxlab.mixing import doge as doge_module
from jaxlab.mixing.doge import (
    DoGEState,
    Mixer,
    averaged_weights,
    cancellation_prerun,
    clip_per_domain,
    current_weights,
    doge,
    domain_gradients,
    flatten_selected,
    mirror_step,
    select_parameters,
    weighted_sum,
)
from jaxlab.mixing.doremi import DoReMiState, domain_excess, domain_means, doremi
from jaxlab.mixing.proxy import ProxyState, make_doge_step, make_doremi_step

__all__ = [
    "DoGEState",
    "DoReMiState",
    "Mixer",
    "ProxyState",
    "averaged_weights",
    "cancellation_prerun",
    "clip_per_domain",
    "current_weights",
    "doge",
    "doge_module",
    "domain_excess",
    "domain_means",
    "doremi",
    "domain_gradients",
    "flatten_selected",
    "mirror_step",
    "make_doge_step",
    "make_doremi_step",
    "select_parameters",
    "weighted_sum",
]
