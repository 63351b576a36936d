"""An openbotstack skill: manifest.yaml with no entrypoint defaults to main:run."""

from typing import Any


def run(input: dict[str, Any]) -> dict[str, str]:
    text: str = input["text"]
    if input.get("by", "words") == "chars":
        return {"text": text[::-1]}
    return {"text": " ".join(reversed(text.split(" ")))}
