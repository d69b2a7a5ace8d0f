"""Benchmark evaluation of UniGeoSeg models (``unigeoseg eval``, docs/evaluation.md).

- ``metrics``: the official per-sample IoU, gIoU, cIoU and Pr@t, and the mask letterbox.
- ``runner``: batches samples through the model, one row per sample.
- ``records``: the per-sample CSV (appended per batch, resumable) and the run manifest.
- ``gather``: every rank's rows to every rank, as tensors (``..distributed`` has the
  process group).
- ``report``: metrics.json, metrics.md, problems.csv; ``overlays``: pictures of the worst.
- ``pipeline``: one run end to end.
"""
