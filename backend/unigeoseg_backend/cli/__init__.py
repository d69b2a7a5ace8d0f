"""The ``unigeoseg`` command line (``main``): serve, predict (``predict``, ``predict_raster``),
eval (``evaluate``), weights (``weights``) and train (the trainer's own entry point)."""
