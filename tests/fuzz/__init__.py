"""Fuzzing: Hypothesis strategies and in-process targets (short runs in CI; the long runs are
bench/fuzz/)."""
