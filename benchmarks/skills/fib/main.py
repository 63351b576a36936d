"""Recursive on purpose: pure interpreter work, no allocation, no I/O."""


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def run(input: dict[str, int]) -> dict[str, int]:
    return {"n": input["n"], "fib": fib(input["n"])}
