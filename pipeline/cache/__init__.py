"""Cached primitives (OCurrent's `Current_cache`), one idea per module.

- `declarations`: declaring builders and publishers (`builder`, `publisher`, `digest`);
- `instances`: their live state in an engine (`Instance`, `PrimitiveNode`, `Cache`), which needs
  from the engine only what `instances.Host` says;
- `storage`: the records of finished runs in the state directory's SQLite database, and the typed
  queries everyone else reads them with (`Database`, `Entry`).
"""
