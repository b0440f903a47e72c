"""Kernels: the ``helix::attention`` op and its backends, fused MLP activations."""
