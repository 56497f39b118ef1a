"""Evaluation harness of pikv-press: imports the package, never imported by it."""
