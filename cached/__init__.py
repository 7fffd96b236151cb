"""cached: a node-local, content-addressed, BLAKE3-verified model cache with peer-to-peer transfer."""

__version__ = "0.1.0"
