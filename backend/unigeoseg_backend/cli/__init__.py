"""The ``unigeoseg`` command line (``main``): serve, predict (``predict``, ``predict_raster``),
eval (``evaluate``), weights (``weights``) and train (``main.run_train`` hands the TOML file to
``unigeoseg_trainer``)."""
