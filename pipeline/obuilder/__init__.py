"""The sandboxed builder, in OBuilder's model (see "The builder" in `docs/architecture.md`, and
the protocols in `protocols.py`); it imports nothing from the engine."""
