"""Fuzz runs outside CI: long Hypothesis runs (hypo.py) and the atheris target (atheris_target.py)."""
