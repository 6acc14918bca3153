"""Layer 3, the two stages: condensation (with its checkpoint) and evaluation. They import the
method's parts and primitives, never the app."""
