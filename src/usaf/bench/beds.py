"""The quality bench's test beds: real pretrained SmolLM2-135M-Instruct made into an MoE, offline.

- ``upcycle``: every expert a copy of the dense MLP, renormalized top-2 of 8 (:mod:`usaf.bench.upcycle`).
  The MoE equals the dense model, but identical experts make the router's gradient exactly zero.
- ``moefy``: the MLP's neurons split into experts that differ (MoEfication), with a router fitted to pick
  the groups that carry a token's activation (:mod:`usaf.bench.moefy`): routing matters.
"""

from __future__ import annotations

from pathlib import Path

from .moefy import prepare_moefied_smollm2
from .upcycle import prepare_upcycled_smollm2

BEDS = ("upcycle", "moefy")


def bed_model(bed: str) -> Path:
    """The cached checkpoint directory of a bed (built on first use)."""
    if bed == "upcycle":
        return prepare_upcycled_smollm2()
    if bed == "moefy":
        return prepare_moefied_smollm2()
    raise ValueError(f"unknown bed {bed!r} (choose {', '.join(BEDS)})")
