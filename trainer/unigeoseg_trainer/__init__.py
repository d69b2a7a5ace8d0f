"""UniGeoSeg training and fine-tuning: multi-task batches with progressive task scheduling.

Modules (docs/training.md describes the recipe and each block):

- ``train``: the loop, ``unigeoseg train CONFIG.toml`` and
  ``torchrun ... -m unigeoseg_trainer CONFIG.toml`` (its docstring has the launch commands).
- ``models``: the starting model (released folder, registry configuration, or pretrained
  parts) and freezing.
- ``lora``: peft LoRA adapters on Phi-1.5, merged for validation and the export.
- ``sharding``: FSDP2 (``fully_shard``) and its full-state checkpoints.
- ``validation``: periodic validation through the evaluation of ``unigeoseg eval``.
- ``config``: the training TOML as frozen dataclasses; errors name the key.
- ``schedule``: task shares over training progress; warm-up + cosine learning rate.
- ``sampler``: task-homogeneous batches from a weighted mixture; distributed,
  deterministic, resumable.
- ``data``: the mixture from the backend's dataset readers; unreadable samples skipped and
  logged; letterboxed, tokenised batches, read ahead on background threads.
- ``augment``: flips that keep image, mask, coordinates and words consistent.
- ``losses``: point-sampled BCE + Dice on every decoder output, LM cross-entropy.
- ``checkpointing``: atomic safetensors + JSON checkpoints (no pickle).
- ``metrics_log``: JSON-lines metrics, TensorBoard if installed, the progress line.

The backend never imports this package.
"""
