"""Old name of the reply benchmark; runs ``python -m bench.reply`` (see bench/reply.py).

    .venv/bin/python bench/reply_time.py [--config reactlearn.toml] [--replies 5] [--batch 16] [bench.reply flags]

``--replies`` is bench.reply's ``--runs``, ``--batch`` its ``--concurrent``. The sampling
settings are now the benchmark's (temperature 0.7, top-p 0.9, 48 new tokens; flags change
them), and results go to bench/out/reply.json and reply.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RENAMED = {"--replies": "--runs", "--batch": "--concurrent"}


def translate(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        flag, eq, rest = a.partition("=")
        out.append(RENAMED.get(flag, flag) + eq + rest)
    return out


if __name__ == "__main__":
    from bench.reply import main

    sys.exit(main(translate(sys.argv[1:])))
