"""`vt leaderboard`: not implemented yet."""
