"""`vt run`: not implemented yet."""
