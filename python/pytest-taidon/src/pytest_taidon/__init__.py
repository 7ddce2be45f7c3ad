"""pytest-taidon: each test gets a fresh, isolated PostgreSQL database leased from Taidon."""

from pytest_taidon.plugin import Lease, TaidonError

__all__ = ["Lease", "TaidonError"]
__version__ = "0.1.0"
