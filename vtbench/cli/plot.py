"""`vt plot`: not implemented yet."""
