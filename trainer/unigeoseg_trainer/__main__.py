"""``python -m unigeoseg_trainer CONFIG.toml``: the entry point torchrun launches."""

import sys

from .train import main

sys.exit(main())
