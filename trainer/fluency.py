"""Cheap text checks for degenerate replies, shared by the gates, the round and the simulation.

    repetition("I am ok I am ok I am ok")   → 0.57   share of repeated word 3-grams
    symbol_spam("Bella! 🌾🌼🌍🌪🌪🌩")         → True   5+ emoji/symbol characters
    degenerate(text, max_repetition=0.5)     → True for either

A small model that learns "people like enthusiasm" tends to string emoji together once it
has started ("Bella! 🌾🌼🌍⏏🌪🌪…"): the base model itself continues an emoji run, so the KL
penalty does not stop it. These checks let the trainer refuse to learn from such replies and
the gates refuse to publish a version that writes them.
"""

from __future__ import annotations

import unicodedata

SPAM_LIMIT = 5   # emoji/symbol characters in one reply that make it spam


def _is_symbol(ch: str) -> bool:
    """Emoji and other symbols (Unicode So), unassigned/private code points, and the
    replacement character left by a multi-byte sequence cut in the middle."""
    return unicodedata.category(ch) in ("So", "Cn", "Co") or ch == "\ufffd"


def words(text: str) -> list[str]:
    """Lower-cased whitespace-separated words, with each emoji/symbol character (Unicode
    category So) a word of its own, so that "👍👍👍👍👍" is a loop and not one long word."""
    out: list[str] = []
    for word in text.lower().split():
        current = ""
        for ch in word:
            if unicodedata.category(ch) == "So":
                out += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            out.append(current)
    return out


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for varied text, → 1 for loops."""
    ws = words(text)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def symbol_spam(text: str, limit: int = SPAM_LIMIT) -> bool:
    """The reply holds ``limit`` or more emoji/symbol characters. Base replies almost never
    do (0 of 128 in docs/LEARNING.md's evaluation); "Great idea! 😊 Let's go 👍" does not."""
    return sum(_is_symbol(c) for c in text) >= limit


def degenerate(text: str, max_repetition: float) -> str:
    """Why ``text`` is degenerate ('' when it is not): emoji/symbol spam or a word loop."""
    if symbol_spam(text):
        return "symbol spam"
    rep = repetition(text)
    if rep > max_repetition:
        return f"word loop (repetition {rep:.2f})"
    return ""
