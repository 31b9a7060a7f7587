"""``python -m sieve`` runs the command line."""

from sieve.cli import main

main()
