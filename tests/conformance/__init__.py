"""Checks every registered method (built-in or entry-point plugin) must pass."""
