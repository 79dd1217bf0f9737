"""The sandboxed builder of DESIGN.md §4 (OBuilder's model); it imports nothing from the engine."""
