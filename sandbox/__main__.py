"""`python -m sandbox ...` is `skill-sandbox ...`."""

from sandbox.cli import main

main(prog_name="skill-sandbox")
