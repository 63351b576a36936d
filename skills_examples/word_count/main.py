"""Counts words, lines and characters of `text`. A wrong input type fails naming the field."""

import msgspec


class Text(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    top: int = 3


def run(input: Text) -> dict[str, object]:
    words = input.text.split()
    counts: dict[str, int] = {}
    for word in words:
        key = word.lower().strip(".,;:!?\"'()")
        if key:
            counts[key] = counts.get(key, 0) + 1
    common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: input.top]
    return {
        "words": len(words),
        "lines": len(input.text.splitlines()),
        "chars": len(input.text),
        "most_common": [[word, count] for word, count in common],
    }
