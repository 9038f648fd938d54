"""Pruning stage: layer-wise Wanda / magnitude pruning of the decoder linears (see layerwise.py)."""

from converter.prune.layerwise import PruneResult, prune

__all__ = ["PruneResult", "prune"]
