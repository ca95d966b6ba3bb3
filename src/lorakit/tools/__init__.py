"""SVD tools on adapters as stored: extract one from a full fine-tune, resize, combine, inspect, compare."""
