"""`python -m gateway` runs the `pgw` command line."""

from gateway.cli import main

main()
