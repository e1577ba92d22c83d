"""The kernel every package imports: the generic registry and the shared errors."""
