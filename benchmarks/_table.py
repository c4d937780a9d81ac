"""Plain-text tables for the benchmark scripts."""


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Print rows (the first is the header) as left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
