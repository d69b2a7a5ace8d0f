"""Benchmark and local dataset readers, shared by the evaluator and the trainer."""
