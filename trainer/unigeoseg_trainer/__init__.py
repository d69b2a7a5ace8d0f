"""UniGeoSeg training and fine-tuning: multi-task batches with progressive task scheduling.

Modules (docs/training.md describes the recipe and each block):

- ``train``: the loop, ``unigeoseg train CONFIG.toml`` and
  ``torchrun ... -m unigeoseg_trainer CONFIG.toml`` (its docstring has the launch commands).
- ``models``: the starting model (released folder or registry configuration) and freezing.
- ``validation``: periodic validation through the evaluation of ``unigeoseg eval``.
- ``config``: the training TOML as frozen dataclasses; errors name the key.
- ``schedule``: task shares over training progress; warm-up + cosine learning rate.
- ``sampler``: task-homogeneous batches from a weighted mixture; distributed,
  deterministic, resumable.
- ``data``: the mixture from the backend's dataset readers; unreadable samples skipped and
  logged; letterboxed, tokenised batches.
- ``augment``: flips that keep image, mask, coordinates and words consistent.
- ``losses``: point-sampled BCE + Dice on every decoder output, LM cross-entropy.
- ``checkpointing``: atomic safetensors + JSON checkpoints (no pickle).
- ``metrics_log``: JSON-lines metrics, TensorBoard if installed, the progress line.

The backend never imports this package.
"""
