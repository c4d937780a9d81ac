"""`vt datasets`: not implemented yet."""
