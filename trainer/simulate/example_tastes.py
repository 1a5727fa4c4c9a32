"""Tastes written as Python, for ``--taste python:trainer.simulate.example_tastes:NAME``.

A taste is any function from the reply's text to a vote: a bool, or a number in [-1, 1]
(each voter then votes 👍 with probability (1 + v) / 2).
"""

from __future__ import annotations

import re

from trainer.simulate.people import NAMES

# A name from the simulated people, not used as a "Name:" speaker label (the small model
# sometimes writes a little play script; that is not talking to someone).
_ADDRESSED = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b(?!\s*:)")


def calls_someone_by_name(text: str) -> bool:
    """People who like being addressed by name ("Sure, Mia! …"). The chat core shows the
    model who is asking ("Mia: …"), so the name is there to be used."""
    return _ADDRESSED.search(text) is not None
