"""The ``unigeoseg`` command line: serve, predict, weights."""
