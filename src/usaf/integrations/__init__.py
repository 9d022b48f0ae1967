"""usaf inside other training frameworks: ``transformers.Trainer`` and ``trl.SFTTrainer`` (:func:`attach`).

Not imported by ``import usaf`` (importing the Trainer takes seconds): ``from usaf.integrations import attach``.
"""

from .trainer import SetupError, attach

__all__ = ["SetupError", "attach"]
