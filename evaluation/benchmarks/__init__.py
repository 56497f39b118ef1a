"""Benchmarks of the evaluation harness: loaders in kvpress's record layout and their official metrics."""
