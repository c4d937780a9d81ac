"""`vt cache`: not implemented yet."""
