"""The reproduction of the papers' claims: ``python experiments/reproduce.py`` (docs/results.md)."""
