"""The kernel's crash report, parsed: one text in, one ``CrashSignature`` out.

This module owns turning a kernel log (a dmesg, a pstore record, a serial console) into a
signature that is the same for the same bug on every machine, in the manner of syzkaller's
``pkg/report``. ``parse_crash(text)``:

1. Report: finds the first oops or panic in the text (a WARNING only if nothing worse is
   there; a soft lockup rather than the RCU stall it causes).
2. Title: the report's kind of failure plus the guilty frame, with every per-machine detail
   (addresses, numbers, CPUs, PIDs, ``+0x11/0x70`` offsets, timestamps) removed, e.g.
   ``general protection fault in sensor_parse_channel`` (``normalise_title``).
3. Guilty frame: the function in ``RIP:``, else the first call-trace frame that is not generic
   kernel plumbing (traps, panic, module loading, syscall entry, the scheduler) or marked
   unreliable (``?``); the guilty module is the ``[module]`` printed after it.
4. Channel file: the last ``loading channel file <path>`` line before the report (in the same
   boot), so a remediation can name the content that crashed the driver.
5. Kind: ``hang`` for lockups, hung tasks, RCU stalls and watchdog resets; ``init_died`` for
   ``Attempted to kill init!``; ``kernel_panic`` when a panic follows the oops; else ``oops``.

Which texts to parse, and what to conclude when none holds a report, is ``detect``'s. The lab
parses a run's console with the same function.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .protocol.wire import CrashKind, CrashSignature

EXCERPT_LIMIT = 8 * 1024

# --------------------------------------------------------------------------- line shapes

# "<4>" syslog level (pstore), "[    1.234567]" timestamp, "[  T1]"/"[ C0]" caller id.
_PREFIX_RE = re.compile(r"^(?:<\d+>)?(?:\[\s*\d+\.\d+\])?(?:\[\s*[CT]\d+\])? ?")
_TIMESTAMP_RE = re.compile(r"\[\s*\d+\.\d+\]")
# A stack frame: "  sensor_init+0x288/0x1000 [sensor]" or "  ? foo+0x1/0x2", old kernels
# may put "[<ffffffff81234567>]" before the name.
_FRAME_RE = re.compile(
    r"^\s*(?:\[<[0-9a-f]+>\]\s*)?(?P<unreliable>\?\s+)?"
    r"(?P<func>[A-Za-z_][A-Za-z0-9_.]*)\+0x[0-9a-f]+/0x[0-9a-f]+"
    r"(?:\s+\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# "RIP: 0010:sensor_parse_channel+0x11d/0xf68 [sensor]" (x86) or "pc : foo+0x1/0x2 [m]"
# (arm64). "RIP: 0033:" is user space; "RIP: 0010:0xffff..." has no symbol.
_RIP_RE = re.compile(
    r"^\s*(?:RIP: 0010:|pc\s*:\s*)(?:\[<[0-9a-f]+>\]\s*)?"
    r"(?P<func>[A-Za-z_][A-Za-z0-9_.]*)\+0x[0-9a-f]+/0x[0-9a-f]+"
    r"(?:\s+\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
_CALL_TRACE_RE = re.compile(r"^\s*(?:Call Trace:|Call trace:|Backtrace:)")
_BOOT_BANNER_RE = re.compile(r"^Linux version \d")
_CHANNEL_FILE_RE = re.compile(r"loading channel file (?P<path>/?\S+)")
_PANIC_RE = re.compile(r"(?<!end )Kernel panic - not syncing: ?(?P<msg>.*)$")
_END_PANIC_RE = re.compile(r"---\[ end Kernel panic|Rebooting in \d+ seconds")
_END_TRACE_RE = re.compile(r"---\[ end trace")
# Compiler clones: the same function, whatever the build called its copy.
_FUNC_SUFFIX_RE = re.compile(r"(?:\.(?:cold|isra|constprop|part|lto_priv|llvm)(?:\.\d+)?)+$")

# Frames that say how the kernel reported or reached the crash, never what crashed.
_GENERIC_FRAMES = re.compile(
    "^(?:"
    + "|".join(
        [
            # reporting the crash
            r"_{0,2}dump_stack\w*",
            r"show_stack\w*",
            r"show_trace\w*",
            r"dump_backtrace\w*",
            r"print_\w*stall\w*",
            r"panic\w*",
            r"__warn\w*",
            r"warn_slowpath\w*",
            r"report_bug",
            r"handle_bug",
            r"fixup_bug",
            r"do_error_trap",
            r"do_trap\w*",
            r"do_int3\w*",
            r"exc_\w+",
            r"asm_exc_\w+",
            r"_{0,2}die(?:_\w+)?",
            r"oops_\w+",
            r"do_exit",
            r"make_task_dead",
            r"page_fault_oops",
            r"kernelmode_fixup_or_oops",
            r"_{0,2}bad_area\w*",
            r"do_user_addr_fault",
            r"do_kern_addr_fault",
            r"handle_page_fault",
            r"fixup_exception",
            # how the code was reached: module loading, syscalls, kernel threads, boot
            r"do_one_initcall",
            r"do_init_module",
            r"load_module",
            r"__do_sys_\w+",
            r"__se_sys_\w+",
            r"__x64_sys_\w+",
            r"__ia32_sys_\w+",
            r"do_syscall_\w+",
            r"entry_SYSCALL_\w+",
            r"syscall_exit\w*",
            r"exit_to_user_mode\w*",
            r"kernel_init\w*",
            r"ret_from_fork\w*",
            r"kthread",
            r"worker_thread",
            r"process_one_work",
            r"start_kernel",
            r"x86_64_start_\w+",
            r"secondary_startup_\w+",
            r"cpu_startup_entry",
            r"do_idle",
            r"rest_init",
            # scheduler and sleeping locks: where a hung task waits, not why
            r"_{0,2}schedule\w*",
            r"io_schedule\w*",
            r"preempt_schedule\w*",
            r"_{0,2}wait_for_\w+",
            r"_{0,2}wait_event\w*",
            r"__wait_\w+",
            r"msleep\w*",
            r"usleep\w*",
            r"_{0,2}mutex_lock\w*",
            r"rwsem_down_\w+",
            r"down(?:_\w+)?",
            r"_{0,2}up_\w+",
            r"\w*spin_lock\w*",
            r"\w*spin_unlock\w*",
            # timer, watchdog and NMI plumbing around a lockup or stall report
            r"watchdog_\w+",
            r"softlockup_\w+",
            r"_{0,2}hrtimer_\w+",
            r"tick_\w+",
            r"update_process_times",
            r"_{0,2}sysvec_\w+",
            r"asm_sysvec_\w+",
            r"_{0,2}irq_exit\w*",
            r"__do_softirq",
            r"handle_softirqs",
            r"rcu_\w+",
            r"_{0,2}nmi_\w+",
            r"arch_trigger_\w+",
            r"trigger_\w*backtrace\w*",
            r"_{0,2}smp_call_function\w*",
            r"flush_smp_call_function\w*",
            # string and memory helpers, sanitizers: the caller is the interesting one
            r"_{0,2}(?:mem|str)(?:cpy|set|cmp|move|len|ncpy|ncmp|nlen|chr|rchr|scpy|lcpy)\w*",
            r"_{0,2}kasan\w*",
            r"__asan\w*",
            r"__sanitizer\w*",
            r"__ubsan\w*",
        ]
    )
    + ")$"
)


@dataclass(frozen=True)
class _ReportType:
    """One shape of kernel report: how its first line looks and how its title is made."""

    start: re.Pattern[str]
    title: Callable[[re.Match[str], str | None], str]
    kind: CrashKind | None = None  # None: OOPS, or KERNEL_PANIC if a panic follows
    wants_frame: bool = True
    weak: bool = False  # a WARNING: chosen only when nothing else is in the text


def _in(prefix: str) -> Callable[[re.Match[str], str | None], str]:
    return lambda m, frame: f"{prefix} in {frame}" if frame else prefix


def _panic_title(m: re.Match[str], frame: str | None) -> str:
    return "kernel panic: " + normalise_panic_message(m.group("msg"))


_HANG_PANIC = re.compile(r"softlockup|hard ?lockup|hung_task|rcu|watchdog", re.IGNORECASE)

_SOFT_LOCKUP = _ReportType(re.compile(r"BUG: soft lockup"), _in("BUG: soft lockup"), CrashKind.HANG)
_RCU_STALL = _ReportType(
    re.compile(r"INFO: rcu_\w+ (?:self-)?detected(?: expedited)? stalls?"),
    _in("INFO: rcu detected stall"),
    CrashKind.HANG,
)

# Order matters only when two patterns match the same line: the first one wins.
_REPORT_TYPES: tuple[_ReportType, ...] = (
    _SOFT_LOCKUP,
    _ReportType(
        re.compile(
            r"(?:watchdog: |NMI watchdog: )(?:BUG: )?(?:Watchdog detected )?"
            r"hard LOCKUP",
            re.IGNORECASE,
        ),
        _in("BUG: hard lockup"),
        CrashKind.HANG,
    ),
    _ReportType(
        re.compile(r"INFO: task \S+ blocked for more than \d+ seconds"),
        _in("INFO: task hung"),
        CrashKind.HANG,
    ),
    _RCU_STALL,
    _ReportType(
        re.compile(r"softdog: Initiating system reboot"),
        lambda m, f: "boot hung: watchdog reset the machine",
        CrashKind.HANG,
        False,
    ),
    _ReportType(
        re.compile(r"BUG: kernel NULL pointer dereference"), _in("BUG: kernel NULL pointer dereference")
    ),
    _ReportType(re.compile(r"BUG: unable to handle page fault"), _in("BUG: unable to handle page fault")),
    _ReportType(
        re.compile(
            r"BUG: unable to handle kernel (?P<what>paging request|NULL pointer "
            r"dereference)"
        ),
        lambda m, f: _in(f"BUG: unable to handle kernel {m.group('what')}")(m, f),
    ),
    _ReportType(
        re.compile(
            r"Unable to handle kernel (?P<what>paging request|NULL pointer "
            r"dereference|access to user memory)"
        ),
        lambda m, f: _in(f"Unable to handle kernel {m.group('what')}")(m, f),
    ),
    _ReportType(re.compile(r"kernel BUG at \S+"), _in("kernel BUG")),
    _ReportType(
        re.compile(
            r"\b(?P<trap>general protection fault|divide error|invalid opcode|"
            r"stack segment|double fault|alignment check|int3)"
            r"(?:,|: [0-9a-f]{4} \[#)"
        ),
        lambda m, f: _in(m.group("trap"))(m, f),
    ),
    _ReportType(
        re.compile(
            r"BUG: (?P<what>KASAN: [a-z-]+|KFENCE: [a-z-]+|"
            r"scheduling while atomic|sleeping function called "
            r"from invalid context|Bad page state|Bad rss-counter state|"
            r"stack guard page was hit|using \w+\(\) in preemptible)"
        ),
        lambda m, f: _in(f"BUG: {m.group('what')}")(m, f),
    ),
    _ReportType(
        re.compile(
            r"(?<!end )Kernel panic - not syncing: ?(?P<msg>Attempted to kill "
            r"init!.*)$"
        ),
        lambda m, f: "kernel panic: Attempted to kill init!",
        CrashKind.INIT_DIED,
        False,
    ),
    _ReportType(re.compile(r"\bOops: [0-9a-fx]+ \[#\d+\]"), _in("Oops")),
    _ReportType(_PANIC_RE, _panic_title, CrashKind.KERNEL_PANIC, False),
    _ReportType(re.compile(r"\bWARNING: CPU: \d+ PID: \d+ at "), _in("WARNING"), weak=True),
)


# --------------------------------------------------------------------------- normalisation


def strip_prefix(line: str) -> str:
    """A log line without its syslog level, timestamp and caller id."""
    return _PREFIX_RE.sub("", line.rstrip("\r"), count=1)


def normalise_function(name: str) -> str:
    """``widget_read_rate.constprop.0`` → ``widget_read_rate``: one name for every build."""
    return _FUNC_SUFFIX_RE.sub("", name)


def normalise_title(text: str) -> str:
    """Remove what differs between machines and boots: timestamps, addresses, offsets,
    ``comm:pid`` tags, CPU numbers, numbers; keep words such as ``ext4`` or ``rcu_preempt``."""
    text = _TIMESTAMP_RE.sub("", text)
    text = re.sub(r"\+0x[0-9a-f]+/0x[0-9a-f]+", "", text)
    text = re.sub(r"\s*\[[^\]\s]+:\d+\]", "", text)  # [insmod:63]
    text = re.sub(r"CPU#?\s*\d+", "CPU", text)
    text = re.sub(r"\s*\([^()]*\d[^()]*\)", "", text)  # (0,0), (error -2)
    text = re.sub(r"\b\w+=\S*\d\S*", "", text)  # exitcode=0x0000000b
    text = re.sub(
        r"(?<![\w.])-?(?:0x[0-9a-fA-F]+|[0-9a-f]{8,}|"
        r"\d+(?:\.\d+)?(?:s|ms|us|ns|[KMG]i?B|kB|[KMG]|%)?)(?![\w])",
        "",
        text,
    )
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(" ,:;-")


def normalise_panic_message(msg: str) -> str:
    """The message of ``Kernel panic - not syncing: <msg>``, per machine details removed."""
    vfs = re.match(r"(VFS: Unable to mount root fs)\b", msg)
    if vfs:  # "... on unknown-block(0,0)" or "on "/dev/sda1"": device names differ
        return vfs.group(1)
    vfs = re.match(r"(VFS: Cannot open root device)\b", msg)
    if vfs:
        return vfs.group(1)
    if msg.startswith("Attempted to kill init!"):
        return "Attempted to kill init!"
    return normalise_title(msg)[:400]


def _is_generic(func: str) -> bool:
    return bool(_GENERIC_FRAMES.match(func))


# --------------------------------------------------------------------------- one text


@dataclass
class _Report:
    type: _ReportType
    match: re.Match[str]
    index: int  # line index of the report's first line


def _find_report(stripped: list[str]) -> _Report | None:
    weak: _Report | None = None
    for i, line in enumerate(stripped):
        for rtype in _REPORT_TYPES:
            m = rtype.start.search(line)
            if m is None:
                continue
            if not rtype.weak:
                if weak is not None and rtype.start is _PANIC_RE:
                    return weak  # panic_on_warn: the WARNING is the cause of the panic
                if rtype is _RCU_STALL:
                    return _prefer_soft_lockup(stripped, i) or _Report(rtype, m, i)
                return _Report(rtype, m, i)
            if weak is None:
                weak = _Report(rtype, m, i)
            break
    return weak


def _prefer_soft_lockup(stripped: list[str], start: int) -> _Report | None:
    """A CPU spinning in a driver trips the RCU stall detector (about 21 s) and the soft
    lockup detector (about 22 s and more) in either order; both reports name the same RIP.
    Report the soft lockup whenever the log holds one, so that one bug gives one title
    however long the machine ran before it was reset."""
    for j in range(start + 1, len(stripped)):
        m = _SOFT_LOCKUP.start.search(stripped[j])
        if m:
            return _Report(_SOFT_LOCKUP, m, j)
        if _BOOT_BANNER_RE.match(stripped[j]):
            return None
    return None


def _guilty_frame(lines: list[str]) -> tuple[str | None, str | None]:
    """(frame, module) from the first ``RIP:`` line, else the first non-generic reliable
    call-trace frame. Kernel plumbing in ``RIP:`` (a memcpy, a spin loop) passes the blame on
    to the call trace, as in syzkaller."""
    for line in lines:
        m = _RIP_RE.match(line)
        if m:
            func = normalise_function(m.group("func"))
            if not _is_generic(func):
                return func, m.group("module")
            break
    in_trace = False
    for line in lines:
        if _CALL_TRACE_RE.match(line):
            in_trace = True
            continue
        if not in_trace:
            continue
        m = _FRAME_RE.match(line)
        if m is None or m.group("unreliable"):
            continue
        func = normalise_function(m.group("func"))
        if not _is_generic(func):
            return func, m.group("module")
    return None, None


def _block_end(stripped: list[str], report: _Report, panics: bool) -> int:
    """Index one past the report's last line."""
    for j in range(report.index + 1, len(stripped)):
        line = stripped[j]
        if panics:
            if _END_PANIC_RE.search(line):
                return j + 1
        elif _END_TRACE_RE.search(line):
            return j + 1
        elif report.type.start.search(line):  # the next report of the same kind
            return j
    return len(stripped)


def _frame_lines(stripped: list[str], report: _Report) -> list[str]:
    """The lines that belong to the report itself, for frame search: up to its end trace,
    the panic it caused, or the next report of the same kind (hung-task reports repeat)."""
    out: list[str] = []
    for j in range(report.index, len(stripped)):
        line = stripped[j]
        if j > report.index and (
            _END_TRACE_RE.search(line) or _PANIC_RE.search(line) or report.type.start.search(line)
        ):
            break
        out.append(line)
    return out


def _excerpt(raw: list[str], start: int, end: int) -> str:
    text = "\n".join(line.rstrip("\r") for line in raw[start:end])
    data = text.encode("utf-8", errors="replace")
    if len(data) > EXCERPT_LIMIT:
        text = data[:EXCERPT_LIMIT].decode("utf-8", errors="ignore")
    return text


def parse_crash(text: str, source: str = "") -> CrashSignature | None:
    """The signature of the first oops or panic in ``text`` (a dmesg, pstore record or console
    log), or ``None`` if it holds none. ``source`` names where the text came from."""
    raw = text.splitlines()
    stripped = [strip_prefix(line) for line in raw]
    report = _find_report(stripped)
    if report is None:
        return None

    panics = (
        report.type.start is _PANIC_RE
        or report.type.kind is CrashKind.INIT_DIED
        or any(_PANIC_RE.search(line) for line in stripped[report.index + 1 :])
    )
    if report.type.kind is not None:
        kind = report.type.kind
    else:
        kind = CrashKind.KERNEL_PANIC if panics else CrashKind.OOPS
    if (
        kind is CrashKind.KERNEL_PANIC
        and report.type.start is _PANIC_RE
        and _HANG_PANIC.search(report.match.group("msg"))
    ):
        kind = CrashKind.HANG  # e.g. "softlockup: hung tasks" with the report itself lost

    frame: str | None = None
    module: str | None = None
    if report.type.wants_frame:
        frame, module = _guilty_frame(_frame_lines(stripped, report))
    title = report.type.title(report.match, frame)

    channel_file: str | None = None
    for line in reversed(stripped[: report.index]):
        m = _CHANNEL_FILE_RE.search(line)
        if m:
            channel_file = m.group("path").lstrip("/")
            break
        if _BOOT_BANNER_RE.match(line):
            break  # a file loaded in an earlier boot of a multi-boot log is not this crash's

    end = _block_end(stripped, report, panics)
    return CrashSignature(
        kind=kind,
        title=title[:512],
        guilty_frame=frame,
        guilty_module=module,
        channel_file=channel_file,
        source=source[:256],
        excerpt=_excerpt(raw, report.index, end),
    )
