"""cache layer of pikv-press (see DESIGN.md); populated by later issues."""
