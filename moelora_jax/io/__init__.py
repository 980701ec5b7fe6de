"""Bytes in and out: local and ``gs://`` storage, atomic writes, the Hugging Face hub."""
