"""cached: a node-local, content-addressed, BLAKE3-verified model cache with peer-to-peer transfer."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version, the package's (pyproject.toml): `cached --version`, `cachectl --version`, /v1/node.
    __version__ = version("cached")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
