"""``python -m unigeoseg_trainer`` with every dropout of the model set to 0 (a test entry
point, also under torchrun).

Dropout draws from each process's own generator (seeded ``seed + rank``), so a batch split
over two processes cannot draw the masks one process draws for the whole batch; TATE's
reasoning branch has dropout 0.1. Tests that compare one process with two on reasoning
samples train without it.
"""

from __future__ import annotations

import sys

from torch import nn

from unigeoseg_trainer import train


def _build_without_dropout(config, device):
    model, tokenizer = build_model(config, device)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model, tokenizer


build_model = train.build_model
train.build_model = _build_without_dropout

if __name__ == "__main__":
    sys.exit(train.main())
