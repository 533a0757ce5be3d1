"""upstream-ops."""
from upstream_ops._version import __version__
