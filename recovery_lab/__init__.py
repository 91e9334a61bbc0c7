"""The lab: builds broken machines, boots them in QEMU and reports what happened.

From the bottom up:

- ``tools``: the one place external tools run; ``checkout``, ``reproducible``: where the
  recipes are, the fixed time of every built file; ``errors``: the root ``LabError``;
- ``scenario``: a scenario file (what to break, what a run must show);
- ``build`` (package): a scenario's disk image, in cached stages; ``pyruntime`` (package):
  the recovery environment's Python runtime; ``disk``: the disk layout and the MBR writer;
  ``seed``: a run's seed disk (the agent's settings and key); ``inspect``: reading a disk a
  run left;
- ``qemu`` (package): one QEMU process with its machine, QMP, console and events;
- ``timeline``: console lines and QMP events as typed entries; ``boot``: boot one image and
  report (``recovery-lab boot``); ``expect``: judge a boot against its scenario;
- ``loop``: the whole recovery loop in QEMU with a server (``recovery-lab run``); ``faults``:
  the faults a run can inject;
- ``dirdemo``: the loop without a VM (``recovery-lab demo``); ``cli``: ``recovery-lab``.
"""
