"""The root of every error the lab raises on purpose: :class:`LabError`.

Each part of the lab has its own errors, derived from it and documented where they are raised:
:class:`~recovery_lab.tools.ToolError` (a tool is missing or failed),
:class:`~recovery_lab.scenario.ScenarioError` (a scenario file is invalid),
:class:`~recovery_lab.build.BuildError` and :class:`~recovery_lab.pyruntime.RuntimeBuildError`
(an image or the recovery environment's Python runtime cannot be built),
:class:`~recovery_lab.disk.DiskError` (a disk layout does not fit, or a disk is not one the lab
made), :class:`~recovery_lab.qemu.QemuError` (QEMU is missing, does not start, or a wait on the
machine failed), :class:`~recovery_lab.dirdemo.DemoError` (a step of the no-VM demo did not do
what it should).

``recovery-lab`` catches ``LabError`` alone; its message names the thing and the fix. The
command exits 2 when the run could not be made (a bad scenario or option, a missing tool, an
image that does not build, QEMU that does not start) and 1 when a run was made but missed its
expectations: a boot or a recovery loop says so in its report, not by an exception; the demo,
which checks itself step by step, raises :class:`~recovery_lab.dirdemo.DemoError`.
"""

from __future__ import annotations


class LabError(Exception):
    """Base class of the errors the lab raises; never raised itself."""
