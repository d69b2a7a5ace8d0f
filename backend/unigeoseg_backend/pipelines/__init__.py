"""Whole jobs built from the engines and the geo code, called by the CLI, the service and tests."""
