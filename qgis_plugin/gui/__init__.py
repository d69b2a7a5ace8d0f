"""Widgets and canvas tools: a thin layer over core/ and the controller."""
