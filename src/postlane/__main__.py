"""``python -m postlane``: the same as the ``postlane`` console script."""

from postlane.cli import main

main()
