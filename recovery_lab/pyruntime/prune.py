"""What the runtime leaves out: stdlib parts and wheel files the agent never imports, and
the debug info of the wheels' extension modules.

The lists are checked, not trusted: after pruning, the tree's own interpreter must import the
agent under chroot (:func:`recovery_lab.pyruntime.chroot.check_import`), and
tests/test_pyruntime.py names the modules that must stay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import tools
from .tree import MULTIARCH, elf_files

# Wheel files that are never imported.
PRUNE_WHEEL_SUFFIXES = (".pyi", ".c", ".h", ".pyx", ".pxd", ".cpp")

PRUNE_WHEEL_NAMES = ("py.typed", "RECORD", "INSTALLER", "REQUESTED", "distutils-precedence.pth")

# Optional C accelerators whose package falls back to pure Python on ImportError, left out
# because they would drag a library in: frozenlist's is C++ and needs libstdc++ (2.4 MB).
PRUNE_WHEEL_EXTENSIONS = ("frozenlist/_frozenlist.",)

# Whole wheel directories never imported at run time: cryptography needs cffi's C backend
# (_cffi_backend, kept), not the cffi package or its C parser; multidict ships a test module.
PRUNE_WHEEL_PREFIXES = ("cffi/", "pycparser/", "multidict/_testcapi.")

# Stdlib parts the agent and its dependencies never import (relative to usr/lib/python3.11).
# Verified by the import check after pruning; see tests/test_pyruntime.py for the modules that
# must stay. ctypes and multiprocessing stay (stdlib code reaches them lazily; small).
PRUNE_STDLIB = (
    # tests, IDE, GUI, docs, packaging tools
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc.py",
    "pydoc_data",
    "doctest.py",
    "distutils",
    "_distutils_system_mod.py",
    "__phello__",
    "__hello__.py",
    "antigravity.py",
    "this.py",
    "EXTERNALLY-MANAGED",
    "sitecustomize.py",  # a symlink to /etc/python3.11, for apport
    "_pydecimal.py",
    "_aix_support.py",
    "_osx_support.py",
    "_bootsubprocess.py",
    # databases, terminals, audio, old network protocols, servers
    "sqlite3",
    "dbm",
    "curses",
    "wsgiref",
    "xmlrpc",
    "msilib",
    "unittest",
    "imaplib.py",
    "nntplib.py",
    "poplib.py",
    "smtplib.py",
    "smtpd.py",
    "telnetlib.py",
    "ftplib.py",
    "mailbox.py",
    "mailcap.py",
    "cgi.py",
    "cgitb.py",
    "asyncore.py",
    "asynchat.py",
    "aifc.py",
    "sunau.py",
    "wave.py",
    "chunk.py",
    "sndhdr.py",
    "imghdr.py",
    "audioop.py",
    "pdb.py",
    "profile.py",
    "cProfile.py",
    "pstats.py",
    "trace.py",
    "tabnanny.py",
    "pyclbr.py",
    "xdrlib.py",
    "nis.py",
    "crypt.py",
    "pipes.py",
    "uu.py",
    # CJK codecs (their C halves are pruned below)
    *(
        f"encodings/{name}.py"
        for name in (
            "big5",
            "big5hkscs",
            "cp932",
            "cp949",
            "cp950",
            "euc_jis_2004",
            "euc_jisx0213",
            "euc_jp",
            "euc_kr",
            "gb18030",
            "gb2312",
            "gbk",
            "hz",
            "iso2022_jp",
            "iso2022_jp_1",
            "iso2022_jp_2",
            "iso2022_jp_2004",
            "iso2022_jp_3",
            "iso2022_jp_ext",
            "iso2022_kr",
            "johab",
            "shift_jis",
            "shift_jis_2004",
            "shift_jisx0213",
        )
    ),
    # C extensions: tests, databases, terminals, audio, CJK codecs
    *(
        f"lib-dynload/{name}.cpython-311-{MULTIARCH}.so"
        for name in (
            "_testbuffer",
            "_testcapi",
            "_testclinic",
            "_testimportmultiple",
            "_testinternalcapi",
            "_testmultiphase",
            "_xxsubinterpreters",
            "_xxtestfuzz",
            "xxlimited",
            "xxlimited_35",
            "_ctypes_test",
            "_sqlite3",
            "_dbm",
            "_gdbm",
            "_curses",
            "_curses_panel",
            "readline",
            "nis",
            "ossaudiodev",
            "audioop",
            "_crypt",
            "_lsprof",
            "_codecs_cn",
            "_codecs_hk",
            "_codecs_iso2022",
            "_codecs_jp",
            "_codecs_kr",
            "_codecs_tw",
            "_multibytecodec",
        )
    ),
)


def prune_stdlib(stdlib: Path) -> list[str]:
    pruned = []
    for rel in PRUNE_STDLIB:
        path = stdlib / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        pruned.append(rel)
    for cache in list(stdlib.rglob("__pycache__")):
        shutil.rmtree(cache)
    return sorted(set(pruned))


def strip_wheel_extensions(site: Path) -> int:
    """``strip --strip-unneeded`` the wheels' ELF files, as Debian's dh_strip does: manylinux
    wheels often ship debug info (aiohttp's HTTP parser: 3.3 MB, 0.6 MB stripped). Debian's
    own files are stripped already. Returns the bytes saved."""
    saved = 0
    for elf in elf_files(site):
        before = elf.stat().st_size
        tools.run(["strip", "--strip-unneeded", elf])
        saved += before - elf.stat().st_size
    return saved
