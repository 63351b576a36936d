"""The hostile-skill suite: one test per attack (see hostile.py)."""
