"""What a sweep does per block: one small module per pass, all on :func:`oneshot.engine.sweep`.

- :mod:`~oneshot.passes.unstructured`: prune every linear layer with a registered method.
- :mod:`~oneshot.passes.owl`: a statistics-only sweep that allocates per-block sparsities (OWL).
- :mod:`~oneshot.passes.structured`: remove MLP neurons / attention heads with bias compensation.
"""
