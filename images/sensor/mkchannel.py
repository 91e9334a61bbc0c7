#!/usr/bin/env python3
"""Write a channel file for the sensor driver (format: FORMAT.md).

    mkchannel.py OUT --template-fields 20 --content-fields 20   # valid
    mkchannel.py OUT --template-fields 21 --content-fields 20   # crashes the driver

Standard library only.
"""

from __future__ import annotations

import argparse
import struct
import sys

MAGIC = b"CHNL"
HEADER = struct.Struct("<4sHHHH")  # magic, version, template, content, reserved
MAX_CONTENT_FIELDS = 32  # the driver's field table size


def build(template_fields: int, content_fields: int, version: int = 1, seed: int = 0x291) -> bytes:
    """Return the bytes of a channel file.

    The header is followed by `content_fields` u32 offsets, then the field
    values (one u32 each) that the offsets point at.
    """
    if not 0 <= content_fields <= MAX_CONTENT_FIELDS:
        raise ValueError(f"content_fields must be 0..{MAX_CONTENT_FIELDS}")
    if not 0 <= template_fields <= 0xFFFF:
        raise ValueError("template_fields must fit in a u16")
    header = HEADER.pack(MAGIC, version, template_fields, content_fields, 0)
    values_start = HEADER.size + 4 * content_fields
    offsets = b"".join(struct.pack("<I", values_start + 4 * i) for i in range(content_fields))
    values = b"".join(struct.pack("<I", (seed * 0x9E3779B1 + i) & 0xFFFFFFFF) for i in range(content_fields))
    return header + offsets + values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output file, e.g. C-00000291-00000000-00000031.sys")
    parser.add_argument("--template-fields", type=int, default=20)
    parser.add_argument("--content-fields", type=int, default=20)
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        data = build(args.template_fields, args.content_fields, args.version)
    except ValueError as exc:
        parser.error(str(exc))
    with open(args.out, "wb") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
