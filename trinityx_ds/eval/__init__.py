"""Evaluation room: parity checks against transformers, HHH suites, reports."""
