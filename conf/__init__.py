# Makes conf/ importable as condense.conf in an installed package (Hydra's pkg:// search path).
