"""``python -m sieve`` runs the command line."""

from sieve.cli.app import main

main()
