"""usaf: ultra-sparse fine-tuning of Mixture-of-Experts language models.

Train a tiny, well-chosen fraction of the real expert weights (default 0.5%) plus the routers::

    import usaf
    handle = usaf.prepare(model, usaf.UsafConfig(density=0.005, quant="4bit"))
    usaf.select(handle, calibration_batches)
    opt = usaf.UsafOptimizer(handle, lr=3e-3, router_lr=1e-4)
    for batch in batches:
        model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    handle.save_delta("delta.safetensors")
"""

from .runtime import tune as _tune

_tune()

from .config import TrainConfig, UsafConfig  # noqa: E402
from .engine.families import FAMILIES, Family, UnsupportedModelError, register  # noqa: E402
from .engine.model import UsafModel, prepare  # noqa: E402
from .engine.optim import UsafOptimizer, make_scheduler  # noqa: E402
from .engine.rigl import drop_fraction, reselect  # noqa: E402
from .engine.select import select  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FAMILIES", "Family", "TrainConfig", "UnsupportedModelError", "UsafConfig", "UsafModel",
    "UsafOptimizer", "drop_fraction", "make_scheduler", "prepare", "register", "reselect", "select",
]
