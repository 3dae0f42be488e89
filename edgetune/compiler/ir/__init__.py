"""The IR: one Node type (graph.py), a Builder that emits nodes with inferred shapes (builder.py),
and the op vocabulary (ops/, one module per op family)."""
