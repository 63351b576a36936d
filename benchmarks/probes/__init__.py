"""Scripts the harness runs in fresh interpreters (`python -I -B <file>`): stdlib, msgspec and
`worker` only, like the processes they stand in for."""
