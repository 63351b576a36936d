"""Skills used only by the benchmark harness (each a directory with its own manifest)."""

from pathlib import Path

SKILLS_DIR = Path(__file__).resolve().parent
