"""`python -m batchgen ...` is `batchgen ...`."""

from batchgen.cli import main

main()
