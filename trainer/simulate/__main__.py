"""``python -m trainer.simulate``: see the package docstring (``--help``)."""

from trainer.simulate import main

main()
