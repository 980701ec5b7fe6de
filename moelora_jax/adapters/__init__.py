"""The adapter layer: frozen (optionally quantized) projections with LoRA, MoE-LoRA, MoSLoRA or MoLE beside them, their
routing and their leaves' names."""
