"""Deterministic workflows: billing runs and invoice cycles. No I/O, no clock, no randomness."""
