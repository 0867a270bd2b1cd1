"""Numeric formats: the bit-level ground truth for every FP8/FP4 check (spec section 4)."""
