"""Reports from the results table: claim verdicts, leaderboards, plots, paper reports."""
