"""usaf: ultra-sparse fine-tuning of Mixture-of-Experts language models.

Train a tiny, well-chosen fraction of the real expert weights (default 0.5%) plus the routers::

    import usaf
    handle = usaf.prepare(model, usaf.UsafConfig(density=0.005, quant="4bit"))
    usaf.select(handle, calibration_batches)
    opt = usaf.UsafOptimizer(handle, lr=2e-4, router_lr=5e-5)
    for batch in batches:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    handle.save_delta("delta.safetensors")
"""

from .config import TrainConfig, UsafConfig
from .families import FAMILIES, Family, UnsupportedModelError, register
from .model import UsafModel, prepare
from .optim import UsafOptimizer, make_scheduler
from .rigl import drop_fraction, reselect
from .select import select

__version__ = "0.1.0"

__all__ = [
    "FAMILIES", "Family", "TrainConfig", "UnsupportedModelError", "UsafConfig", "UsafModel",
    "UsafOptimizer", "drop_fraction", "make_scheduler", "prepare", "register", "reselect", "select",
]
