"""The hostile-skill suite: one test per attack in issue 3 (see hostile.py)."""
