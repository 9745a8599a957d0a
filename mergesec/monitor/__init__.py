"""WeightWatch-style monitoring of fine-tuned models from their weight difference.

``weight_directions`` takes the top left singular vectors of each residual writer's ΔW;
``direction_cosines`` summarises an input by its extreme token cosines along them;
``Calibration`` learns the benign range and flags inputs outside it; ``SteeringHooks`` projects
triggered directions out of the residual stream; ``top_activating`` and ``write_audit_markdown``
show what each direction responds to.
"""

from mergesec.monitor.audit import top_activating, write_audit_markdown
from mergesec.monitor.directions import (
    Directions,
    exact_left_singular,
    randomized_left_singular,
    subspace_sines,
    weight_directions,
)
from mergesec.monitor.scoring import (
    Calibration,
    Columns,
    DirectionScores,
    direction_cosines,
    monitor_forward,
    score_inputs,
    token_cosines,
)
from mergesec.monitor.steering import SteeringHooks, orthonormal_basis, project_out

__all__ = [
    "Calibration",
    "Columns",
    "DirectionScores",
    "Directions",
    "SteeringHooks",
    "direction_cosines",
    "exact_left_singular",
    "monitor_forward",
    "orthonormal_basis",
    "project_out",
    "randomized_left_singular",
    "score_inputs",
    "subspace_sines",
    "token_cosines",
    "top_activating",
    "weight_directions",
    "write_audit_markdown",
]
