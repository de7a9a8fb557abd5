"""Pruning methods: pure functions of tensors, registered in :mod:`oneshot.methods.registry`."""
