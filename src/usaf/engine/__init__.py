"""The math: families, the fused sparse-delta experts, deltas, frozen stores, loss, selection, RigL, the optimizer.

Imports only the foundation modules (``usaf.config``, ``usaf.io``, ``usaf.units``, ``usaf.runtime``)."""
