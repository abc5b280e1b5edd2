"""Reduction: stacking, reciprocal-space transform, projections (see DESIGN.md §5)."""
