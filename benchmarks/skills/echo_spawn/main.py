from typing import Any


def run(input: Any) -> Any:
    return input
