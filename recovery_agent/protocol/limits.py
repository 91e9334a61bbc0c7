"""Numeric limits of the wire that code without pydantic needs too (``bootenv`` clamps what it
reads from grubenv to them, and the installer runs on the distribution's bare Python)."""

# The largest counter a device may report (boot counts, attempts, indexes): 2**31 - 1, what a
# 32-bit INTEGER column holds. The agent clamps larger values it reads (a damaged grubenv).
COUNTER_MAX = 2**31 - 1
