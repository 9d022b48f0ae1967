"""``python -m usaf ...`` (what ``torchrun --nproc-per-node N -m usaf train ...`` runs on every rank)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
