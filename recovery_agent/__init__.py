"""Quick Machine Recovery agent: runs in the recovery environment of a machine whose boots
keep failing; finds why, reports it signed, applies a signed and approved remediation."""

from .protocol.version import __version__

__all__ = ["__version__"]
