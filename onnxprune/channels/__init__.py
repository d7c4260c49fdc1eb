"""The channel engine: which channels are dead, which go together, and deleting them."""
