"""The version of the agent, the server and the lab (one distribution, one version)."""

__version__ = "0.1.0"
