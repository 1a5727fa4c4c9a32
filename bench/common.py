"""Shared by the benchmark scripts: ``--set key=value`` pairs → typed [trainer] overrides."""

from __future__ import annotations


def value(text: str):
    """'3' → 3, '1e-3' → 0.001, 'true'/'false' → bool, anything else stays a string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def parse_overrides(pairs: list[str]) -> dict:
    """``["lr=1e-3", "epochs=3"]`` → ``{"lr": 0.001, "epochs": 3}``; a pair without '=' is an error."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"--set takes KEY=VALUE pairs, got {bad[0]!r}")
    return {k: value(v) for k, v in (p.split("=", 1) for p in pairs)}
