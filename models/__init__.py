"""Model code for the LRA harness: attention backends, encoder, heads. Imports nothing from `lra`."""
