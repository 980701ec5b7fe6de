"""Adapters and weights on disk: our export, PEFT, merged weights, MoLE's sources and warm starts."""
