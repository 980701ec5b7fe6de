"""The models: architectures carrying adapters on their projections, checkpoint and tokenizer loading, the loss and
generation."""
