"""Old name of the training benchmark; runs ``python -m bench.train`` (see bench/train.py).

    .venv/bin/python bench/round_time.py [--replies 32] [--new-tokens 64] [--threads N] [--set key=value ...]
                                         [--config X] [bench.train flags]

Kept with its old defaults (32 replies of up to 64 tokens: the README's "a training round"
row); ``python -m bench.train`` defaults to a 256-reply round. ``--cache-dir`` is now
``model.cache_dir`` in a ``--config`` file. Results go to bench/out/train.json and train.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OLD_DEFAULTS = {"--replies": "32", "--new-tokens": "64"}


def with_defaults(argv: list[str]) -> list[str]:
    given = {a.partition("=")[0] for a in argv}
    if "--cache-dir" in given:
        raise SystemExit("--cache-dir: set model.cache_dir in a --config file instead")
    extra = [x for flag, v in OLD_DEFAULTS.items() if flag not in given for x in (flag, v)]
    return extra + argv


if __name__ == "__main__":
    from bench.train import main

    sys.exit(main(with_defaults(sys.argv[1:])))
