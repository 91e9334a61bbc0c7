"""The agent's one exception root, and the root of every refused change to the OS disk.

Every error the agent raises on purpose derives from ``AgentError``, so its command line can
tell "the agent said no, and why" (one line naming the thing and the fix) from a bug (a
traceback). The errors themselves live with the concept they belong to:

- ``settings.SettingsError``: the settings file is missing or invalid;
- ``bootenv.BootEnvError``: GRUB's environment block cannot be read or written safely;
- ``inventory.InventoryError``: the OS root cannot be read at all;
- ``RemediationError`` (here, because the OS root walk, the journal and the remediation all
  raise it) and its kinds: ``osroot.PathRejected``, ``osroot.MissingFile``,
  ``journal.JournalError``, ``actions.HashMismatch``, ``state.NotConfirmed``;
- ``cli.UsageError``: a command's arguments are not valid;
- ``install.InstallError`` (``InstallRefused`` before anything changed) and
  ``install.manifest.ManifestError``: installing on or uninstalling from a machine.

The protocol package keeps its own root, ``protocol.errors.ProtocolError`` (key files,
envelopes, the server's answers): it is imported by the server too and imports nothing here.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose; its message names the thing and the fix."""


class RemediationError(AgentError):
    """Raised when the agent will not change the OS disk as asked: a directive cannot be applied,
    undone or purged, or one of the agent's own state files cannot be written safely. The
    message names the thing and the fix. Raised by preflight, nothing on disk has changed;
    raised by a step, what the directive had done is rolled back first (the message says so)."""
