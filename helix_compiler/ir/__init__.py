"""Intermediate representations: segment chains, node meta keys, schedule instructions."""
