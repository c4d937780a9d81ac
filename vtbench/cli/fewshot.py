"""`vt fewshot`: not implemented yet."""
