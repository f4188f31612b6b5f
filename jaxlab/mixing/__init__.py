"""Data mixers as init/update state machines: DoGE and the DoReMi baseline.

Every mixer follows one protocol (:class:`Mixer`: ``update(Observation, state) -> (weights,
state)``) and is registered by name in :data:`MIXERS`. Importing this package registers the
``doge`` and ``doremi`` mixers and training objectives.
"""

from jaxlab.mixing._doge import (
    DoGEState,
    averaged_weights,
    cancellation_prerun,
    cancellation_ratios,
    clip_per_domain,
    current_weights,
    doge,
    domain_gradients,
    flatten_selected,
    mirror_step,
    row_domain_gradients,
    select_parameters,
    weighted_sum,
)
from jaxlab.mixing._doremi import DoReMiState, domain_excess, domain_means, doremi
from jaxlab.mixing._mixer import MIXERS, Mixer, Observation
from jaxlab.mixing.objectives import (
    doge_objective,
    domain_masks,
    domain_mean_losses,
    doremi_objective,
)
from jaxlab.mixing.proxy import (
    doge_gradients,
    doge_proxy_objective,
    doge_update,
    doremi_gradients,
    doremi_proxy_objective,
    make_doge_step,
    make_doremi_step,
)

__all__ = [
    "DoGEState",
    "DoReMiState",
    "MIXERS",
    "Mixer",
    "Observation",
    "averaged_weights",
    "cancellation_prerun",
    "cancellation_ratios",
    "clip_per_domain",
    "current_weights",
    "doge",
    "doge_gradients",
    "doge_update",
    "doge_proxy_objective",
    "doge_objective",
    "domain_masks",
    "domain_mean_losses",
    "doremi_gradients",
    "doremi_proxy_objective",
    "doremi_objective",
    "domain_excess",
    "domain_means",
    "doremi",
    "domain_gradients",
    "flatten_selected",
    "mirror_step",
    "make_doge_step",
    "make_doremi_step",
    "row_domain_gradients",
    "select_parameters",
    "weighted_sum",
]
