"""Text to token batches: examples, tokenization, packing, batch order, the input pipeline and the task files."""
