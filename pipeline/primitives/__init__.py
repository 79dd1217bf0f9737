"""Primitives that connect pipelines to the world, built only on `pipeline`'s public API.

- `pipeline.primitives.git`: watched git repositories (local and remote) as inputs, a cached
  fetch into local mirrors, temporary checkouts and file reads of a commit.
- `pipeline.primitives.obuilder`: builds of a spec as cached primitives.
"""
