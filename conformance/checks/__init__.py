"""Checks: numeric conformance, FP8 dialect forensics, MoE routing, graph replay, end to end."""
