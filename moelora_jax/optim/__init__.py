"""Optimizers of adapter trees: the Riemannian preconditioner and the whole optimizer built from a config."""
