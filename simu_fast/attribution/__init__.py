"""Integrated-gradient attribution over MLP neurons: NeuronAttributor, NeuronScores, the architecture registry."""
from .architectures import REGISTRY, mlp_down_projections
from .integrated_gradients import NeuronAttributor
from .quadrature import quadrature
from .reference import reference_neuron_attribution
from .scores import NeuronScores

__all__ = ["NeuronAttributor", "NeuronScores", "reference_neuron_attribution", "mlp_down_projections", "REGISTRY",
           "quadrature"]
