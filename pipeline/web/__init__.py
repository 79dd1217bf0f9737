"""The web UI of pipeline: an aiohttp application on the engine's event loop."""
