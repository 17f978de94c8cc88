"""Placement: the leader-elected service that decides which runtime pod loads which model."""
