"""Data for the LRA tasks: generators, readers, the token cache and the DataModule. Imports no model code."""
