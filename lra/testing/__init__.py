"""Checks a user can run on their own backend (see lra.testing.contract)."""
