"""Text a skill wrote, made safe to put where people and programs read the supervisor's words.

A skill chooses its error message, its stdout and its stderr. Shown as they are, they can
imitate a supervisor verdict ("runtime: circuit breaker open"), or drive a terminal: escape
sequences that erase a line and print another status, set the window title, or write the
clipboard. Verdicts never depend on this text (see `ErrorKind`); this module keeps it from
fooling the person reading it.
"""

from __future__ import annotations

import re
import unicodedata

#: A skill's own error text is cut to this many characters.
MAX_SKILL_ERROR = 4096
_SKILL_PREFIX = "skill error: "
#: Plain text that starts like an exception name: ASCII letters, digits, underscores and dots,
#: ended by a colon, a space, a parenthesis or the end (not by a look-alike letter).
_PLAIN_START = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*(?=[:\s(]|$)")


def printable(text: str, keep: str = "\n\t") -> str:
    """`text` with every control, format (zero-width, bidi), separator and unassigned
    character but those in `keep` written as a visible `\\uXXXX` escape."""
    if text.isprintable() and not any(char in text for char in "\u2028\u2029"):
        return text  # the common case: nothing to look at character by character
    return "".join(char if char in keep or _shown(char) else f"\\u{ord(char):04x}"
                   for char in text)


def _shown(char: str) -> bool:
    return unicodedata.category(char)[0] not in "CZ" or char == " "


def skill_text(text: str) -> str:
    """A skill's error message as the supervisor reports it: bounded, printable, and marked
    as the skill's unless it plainly starts with an exception name other than `runtime`
    (`ValueError: …` stays as it is; `runtime: …`, or anything starting with a look-alike
    letter, an escape or an invisible character, becomes `skill error: …`)."""
    text = printable(text[:MAX_SKILL_ERROR])
    start = _PLAIN_START.match(text)
    if text and (start is None or start.group().split(".")[0].lower() == "runtime"):
        return _SKILL_PREFIX + text
    return text
