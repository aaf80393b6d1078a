"""Exact top-k / threshold selection (radix select) and SIMU's neuron masks."""
from ..ops.radix_select import kth_largest, threshold_mask, topk_mask
from .critical_sets import critical_set, select_neurons
from .neuron_mask import NeuronMask

__all__ = ["kth_largest", "topk_mask", "threshold_mask", "select_neurons", "critical_set", "NeuronMask"]
