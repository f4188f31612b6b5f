"""Constrained variational-inequality solvers: ACVI and projected first-order baselines.

The ACVI code lives in the private module ``_acvi`` so that ``jaxlab.solvers.acvi`` is the
function, not a module it shadows (as optax keeps ``optax._src``)."""

from jaxlab.solvers._acvi import ACVIConfig, ACVIResult, ACVITrajectory, acvi, acvi_until
from jaxlab.solvers.baselines import (
    BASELINES,
    Trajectory,
    first_reach,
    run_extragradient,
    run_gda,
    run_lookahead_gda,
    run_optimistic_gda,
)
from jaxlab.solvers.problems import (
    Ball,
    Box,
    Inequalities,
    Nonnegative,
    Polyhedron,
    VIProblem,
    bilinear_2d,
    bilinear_simplex_game,
    forsaken_game,
    matrix_game,
    project_simplex,
    von_neumann_ratio_game,
)

__all__ = [
    "ACVIConfig",
    "ACVIResult",
    "ACVITrajectory",
    "BASELINES",
    "Ball",
    "Box",
    "Inequalities",
    "Nonnegative",
    "Polyhedron",
    "Trajectory",
    "VIProblem",
    "acvi",
    "acvi_until",
    "first_reach",
    "bilinear_2d",
    "bilinear_simplex_game",
    "forsaken_game",
    "matrix_game",
    "project_simplex",
    "run_extragradient",
    "run_gda",
    "run_lookahead_gda",
    "run_optimistic_gda",
    "von_neumann_ratio_game",
]
