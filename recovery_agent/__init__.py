"""Quick Machine Recovery agent: runs in the recovery environment of a machine whose boots
keep failing; finds why, reports it signed, applies a signed and approved remediation."""

__version__ = "0.1.0"
