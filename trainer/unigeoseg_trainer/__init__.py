"""UniGeoSeg training and fine-tuning (multi-task, progressive task scheduling).

Empty on purpose: training arrives with its own issue, after the model (issue 4). Nothing here
is imported by the backend.
"""
