"""Activation ("gradient") checkpointing of the model's repeated layers.

A checkpointed call keeps only its inputs during the forward and runs once more in the
backward to rebuild the activations its gradients need: less memory for one more forward.
Values and gradients are those of the plain call; the RNG state is replayed, so dropout draws
the same numbers. PyTorch's non-reentrant variant is used: it needs no input that requires
grad and lets keyword arguments and non-tensor outputs through.

A layer checkpoints only while gradients are recorded and it is in training mode (the rule of
transformers' ``GradientCheckpointingLayer``, which Phi's decoder layers use): under
``no_grad`` (inference) or in eval mode the call is plain.

Public API:
    checkpoint_call(function, *args, **kwargs)     (always checkpointed)
    maybe_checkpoint(enabled, function, *args)     (checkpointed when enabled, grad on)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint


def checkpoint_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, its activations recomputed in the backward."""
    # Looked up at call time, so a test can count the calls.
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def maybe_checkpoint(enabled: bool, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, checkpointed when ``enabled`` and gradients are recorded.

    Callers pass ``enabled = self.gradient_checkpointing and self.training``.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint_call(function, *args)
    return function(*args)
