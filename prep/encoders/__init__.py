"""One module per model: load (Hub id or local dir), encode a batch, unload."""
