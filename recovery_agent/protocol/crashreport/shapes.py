"""The report shapes: how each kind of kernel report starts, where its frames come from,
which frame is guilty and what its title says (``SHAPES``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..wire import CrashKind
from .lines import (
    AT_RE,
    BOOT_BANNER_RE,
    OFFSET,
    RIP_RE,
    SYM,
    SYMBOL,
    Frame,
    Log,
    frames_of,
    is_stack_start,
    normalise_function,
)
from .neverguilty import any_of, never_guilty

# --------------------------------------------------------------------------- report shapes


@dataclass
class Report:
    """One report found in a log: its shape, its first line and the lines that are its own."""

    shape: Shape
    match: re.Match[str]
    lines: Log  # the whole log
    index: int  # the report's first line
    own: list[int] = field(default_factory=list)  # indices of the report's own lines

    @property
    def context(self) -> str:
        return self.lines[self.index].context


# A source of candidate frames, in the order they are tried.
FrameSource = Callable[[Report], Iterator[Frame]]
# Picks the guilty frame from all candidates (skipped ones included, for anchors).
Picker = Callable[[list[Frame], re.Pattern[str] | None], Frame | None]


def _first_not_skipped(frames: list[Frame], skip: re.Pattern[str] | None) -> Frame | None:
    for f in frames:
        if not _skipped(f.function, skip):
            return f
    return None


def _skipped(function: str, skip: re.Pattern[str] | None) -> bool:
    return never_guilty(function) or (skip is not None and skip.search(function) is not None)


@dataclass(frozen=True)
class Shape:
    """One shape of kernel report: how its first line looks, how it is titled and where its
    guilty frame is."""

    name: str  # for the docs and tests: "KASAN", "GPF", ...
    keyword: str  # a line holds this before ``start`` is tried (cheap, and exact)
    start: re.Pattern[str]  # searched in the line (without prefix)
    title: str  # with {named groups} of ``start``; " in F" added when a frame is found
    sources: tuple[FrameSource, ...] = ()  # where candidate frames come from; () for none
    skip: tuple[str, ...] = ()  # more never-guilty patterns, for this shape only
    pick: Picker = _first_not_skipped
    kind: CrashKind | None = None  # None: OOPS, or KERNEL_PANIC if a panic follows
    weak: bool = False  # a plain WARNING: a worse report after it wins
    continues: bool = False  # also seen inside another report (Oops:, Kernel panic)
    panic: bool = False  # a "Kernel panic - not syncing" line
    needs_stack: bool = True  # without a call trace the report is corrupted
    corrupted: bool = False  # this line alone means the report's head was lost
    frame_in_title: bool = True
    skip_re: re.Pattern[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_re", any_of(self.skip) if self.skip else None)


# --- frame sources -------------------------------------------------------------------


_HEX_RE = re.compile(r"[0-9a-f]{8,16}")


def _header(r: Report) -> Iterator[Frame]:
    """The function the report's first line names (``BUG: KASAN: ... in f+0x1/0x2``)."""
    func = r.match.groupdict().get("func")
    if func and not _HEX_RE.fullmatch(func):  # "corrupted in: ffffffff8343632e": no symbol
        yield Frame(normalise_function(func), r.match.groupdict().get("module"), r.index)


def _rip(r: Report) -> Iterator[Frame]:
    """The crashing instruction's function (``RIP:``, ``pc :``, ``IP:``, ``NIP``)."""
    for i in r.own:
        m = RIP_RE.match(r.lines[i].text)
        if m is not None:
            yield Frame(normalise_function(m.group("func")), m.group("module"), i)
            return


def _trace(r: Report) -> Iterator[Frame]:
    """The first call trace of the report, up to the next stack's start."""
    for pos, i in enumerate(r.own):
        text = r.lines[i].text
        if is_stack_start(text):
            yield from frames_of(text, i)  # very old kernels: "Call Trace: [<addr>] f+0x1/0x2"
            yield from _stack_after(r, pos)
            return


def _frames_after_header(r: Report) -> Iterator[Frame]:
    """The frames printed right after the first line (KMSAN, KFENCE: no "Call Trace:"), up to
    the empty line or stack start that follows them."""
    seen = False
    for i in r.own[1:]:
        text = r.lines[i].text
        frames = frames_of(text, i)
        if not frames:
            if seen and (text.strip() == "" or is_stack_start(text)):
                return
            continue
        seen = True
        yield from frames


MARKERS: set[str] = set()  # every _after() marker: lines an excerpt must keep


def _after(marker: str, source: Callable[[Report, int], Iterator[Frame]]) -> FrameSource:
    MARKERS.add(marker)

    def frames(r: Report) -> Iterator[Frame]:
        for pos, i in enumerate(r.own):
            if marker in r.lines[i].text:
                yield from source(r, pos)
                return

    return frames


def _at_line(r: Report, pos: int) -> Iterator[Frame]:
    """The first lockdep ``at: f+0x1/0x2`` at or after own-line position ``pos``."""
    for i in r.own[pos:]:
        m = AT_RE.search(r.lines[i].text)
        if m is not None:
            yield Frame(normalise_function(m.group("func")), m.group("module"), i)
            return


_LAST_FUNCTION_RE = re.compile(rf"last function: {SYM}")


def _last_function(r: Report, pos: int) -> Iterator[Frame]:
    """The work function a workqueue report names (``last function: f``)."""
    m = _LAST_FUNCTION_RE.search(r.lines[r.own[pos]].text)
    if m is not None:
        yield Frame(normalise_function(m.group("func")), None, r.own[pos])


def _chain(r: Report, pos: int) -> Iterator[Frame]:
    """The frames of lockdep's dependency chain, after the held lock's ``at:`` line."""
    for k, i in enumerate(r.own[pos:], pos):
        if AT_RE.search(r.lines[i].text):
            yield from _stack_after(r, k)
            return


def _next_frame_line(r: Report, pos: int) -> Iterator[Frame]:
    """The first frame line after own-line position ``pos`` (``[<addr>] f+0x1/0x2``)."""
    for i in r.own[pos + 1 :]:
        frames = frames_of(r.lines[i].text, i)
        if frames:
            yield frames[0]
            return


def _stack_after(r: Report, pos: int) -> Iterator[Frame]:
    """Frames from own-line position ``pos`` on, up to the next stack's start."""
    for i in r.own[pos + 1 :]:
        text = r.lines[i].text
        if is_stack_start(text):
            return
        yield from frames_of(text, i)


INTERRUPT_MARKERS = ("apic_timer_interrupt", "Exception stack", "el1h_64_irq", "<EOI>")


def _stalled(r: Report) -> Iterator[Frame]:
    """The stalled CPU's own stack in an RCU stall or lockup report: after the timer
    interrupt that found it (its RIP, then what the interrupt interrupted), else after the
    first kernel RIP; never the stall printer's own stack before it."""
    own = r.own
    start = None
    for pos, i in enumerate(own):
        text = r.lines[i].text
        if any(m in text for m in INTERRUPT_MARKERS):
            start = pos
            if "<EOI>" in text:
                yield from frames_of(text, i)
            break
    if start is None:
        for pos, i in enumerate(own):
            if RIP_RE.match(r.lines[i].text):
                start = pos - 1
                break
    if start is None:
        return
    yielded = False
    for i in own[start + 1 :]:
        text = r.lines[i].text
        if yielded and text.startswith("rcu:"):
            return  # the stall printer again: the grace-period kthread's stack follows
        m = RIP_RE.match(text)
        if m is not None:
            yield Frame(normalise_function(m.group("func")), m.group("module"), i)
            yielded = True
            continue
        if is_stack_start(text) and "Call Trace" not in text and "Call trace" not in text:
            return
        for f in frames_of(text, i):
            yielded = True
            yield f


# --- pickers -------------------------------------------------------------------------

# Stalls: where a CPU loops, the report stops it at a random place inside the loop; the frame
# just above the code that dispatched the looping work names the bug every time. These
# dispatchers (syscall entry, file and socket operations, work items, softirqs, timers, module
# initcalls, page faults) are the anchors.
STALL_ANCHORS = any_of(
    (
        # work dispatch: work items, syscalls, softirqs, timers, kernel threads, initcalls
        "process_one_work", "do_syscall_", "do_fast_syscall_", "sysenter_dispatch", "tracesys_phase2",
        "el0_svc_handler", "invoke_syscall", "ret_fast_syscall", "netif_receive_skb", "do_softirq",
        "call_timer_fn", "_run_timers", "run_timer_softirq", "hrtimer_run", "run_ksoftirqd",
        "smpboot_thread_fn", "^kthread$", "start_secondary", "cpu_startup_entry", "ret_from_fork",
        "^do_one_initcall$", "tasklet_action", "tasklet_hi_action",
        # file operations: the frame above names the file's driver
        "vfs_write", "vfs_read", "vfs_iter_read", "vfs_iter_write", "do_iter_read", "do_iter_write",
        "call_read_iter", "call_write_iter", "new_sync_read", "new_sync_write", "vfs_ioctl",
        "ksys_ioctl", "compat_ioctl", "compat_sys_ioctl", "blkdev_driver_ioctl", "blkdev_ioctl",
        "do_iter_readv_writev", "^call_mmap", "mmap_region", "do_mmap", "do_dentry_open", "vfs_open",
        # socket operations: the frame above names the protocol
        "^sock_sendmsg", "^sock_recvmsg", "^sock_release", "^__sock_release", "^setsockopt$",
        "kernel_setsockopt", "sock_common_setsockopt", "^listen$", "kernel_listen", "sk_common_release",
        "^sock_mmap", "^accept$", "kernel_accept", "^sock_do_ioctl", "^sock_ioctl", "^compat_sock_ioctl",
        "^nfnetlink_rcv_msg", "^rtnetlink_rcv_msg", "^netlink_dump", "^(?:sys_)?(?:socketpair|connect|ioctl)",
        # page faults and the work done on the way back to user space
        "__do_fault", "do_page_fault", "^page_fault$", "__fput", "task_work_run", "exit_to_usermode",
        "smp_call_function",
    )
)  # fmt: skip


def pick_stalled(frames: list[Frame], skip: re.Pattern[str] | None) -> Frame | None:
    """The last frame before the first dispatcher (``STALL_ANCHORS``) that is not skipped; a
    stall in ``smp_call_function`` is one bug wherever the other CPU was."""
    previous: Frame | None = None
    for f in frames:
        if STALL_ANCHORS.search(f.function):
            if "smp_call_function" in f.function:
                return Frame("smp_call_function", f.module, f.line)
            return previous or f
        if not _skipped(f.function, skip):
            previous = f
    return _first_not_skipped(frames, skip)


# Hung tasks: a task blocked on a lock or an RCU grace period is a victim; all such victims of
# one culprit are one bug (rtnl_lock, synchronize_rcu), the rest are named by the first frame
# that is not waiting.
_HUNG_WAITING = any_of(
    (
        "sched", "_lock", "_slowlock", "down", "rwsem", "completion", "kthread", "wait",
        "synchronize", "context_switch", "__switch_to", "cancel_delayed_work", "rcu_barrier",
    )
)  # fmt: skip
_HUNG_BUCKETS = (
    ("rtnl_lock", "rtnl_lock"),
    ("synchronize_rcu", "synchronize_rcu"),
    ("synchronize_srcu", "synchronize_rcu"),
    ("synchronize_net", "synchronize_rcu"),
    ("synchronize_sched", "synchronize_rcu"),
)


def _pick_hung(frames: list[Frame], skip: re.Pattern[str] | None) -> Frame | None:
    for f in frames:
        for anchor, bucket in _HUNG_BUCKETS:
            if anchor in f.function:
                return Frame(bucket, f.module, f.line)
    for f in frames:
        if not _skipped(f.function, skip) and not _HUNG_WAITING.search(f.function):
            return f
    return None


# --- the shapes ----------------------------------------------------------------------

_OOPS = (_rip, _trace)  # the crashing instruction, then the call trace
_HANG = CrashKind.HANG


def _shape(name: str, keyword: str, start: str, title: str, *sources: FrameSource, **kw: Any) -> Shape:
    return Shape(name, keyword, re.compile(start), title, sources, **kw)


# Order matters only when two shapes match the same line: the first one wins. Each entry:
# name (the docs' report kind), keyword (a cheap test before the pattern), the first line's
# pattern, the title's words, then where the guilty frame comes from and what else to skip.
SHAPES: tuple[Shape, ...] = (
    # --- sanitizers: the function in the first line, then the call trace
    _shape("KASAN", "KASAN:", rf"BUG: KASAN: (?P<what>double-free or invalid-free|[a-z-]+) in {SYM}",
           "BUG: KASAN: {what}", _header, _trace,
           skip=("kernel_fault", "tag_check", "mem_abort", "^el1_", "^el1h_")),
    _shape("KASAN", "KASAN:", r"BUG: KASAN: (?P<what>[a-z-]+)",
           "BUG: KASAN: {what}", needs_stack=False),
    _shape("KMSAN", "KMSAN:", rf"BUG: KMSAN: (?P<what>[a-z-]+) in {SYM}",
           "BUG: KMSAN: {what}", _frames_after_header, _header, needs_stack=False,
           skip=("alloc_skb", "netlink_ack", "netlink_rcv_skb", "_encrypt$", "^(?:crypto|cipher|drbg|rng)_",
                 "usb_submit_urb", "usb_start_wait_urb", "usb_bulk_msg", "usb_interrupt_msg")),
    _shape("KFENCE", "KFENCE:",
           r"BUG: KFENCE: (?P<what>(?:use-after-free|out-of-bounds|invalid) (?:read|write)"
           rf"|invalid free|memory corruption) in {SYM}",
           "BUG: KFENCE: {what}", _header, _frames_after_header, needs_stack=False),
    _shape("KCSAN", "KCSAN:",
           rf"BUG: KCSAN: (?P<what>[a-z-]+(?:: [a-z-]+)?) in {SYM} / (?P<other>{SYMBOL})",
           "BUG: KCSAN: {what} in {func} / {other}", _header, needs_stack=False, frame_in_title=False),
    _shape("KCSAN", "KCSAN:", rf"BUG: KCSAN: (?P<what>[a-z-]+(?:: [a-z-]+)?) in {SYM}",
           "BUG: KCSAN: {what}", _header, _frames_after_header, needs_stack=False),
    _shape("KCSAN", "KCSAN:", r"BUG: KCSAN: (?P<what>[a-z-]+)",
           "BUG: KCSAN: {what}", needs_stack=False),
    _shape("UBSAN", "UBSAN:", r"UBSAN: (?P<what>[A-Za-z][A-Za-z -]{0,60}) in ",
           "UBSAN: {what}", _trace, skip=("ubsan", "overflow")),
    # --- lockdep and locking: the lock taken wrongly, from lockdep's "at:" lines
    _shape("lockdep", "circular locking", r"(?:WARNING|INFO): possible circular locking dependency detected",
           "possible deadlock", _after("is trying to acquire lock", _at_line),
           _after("already holding lock", _at_line), _after("already holding lock", _chain),
           skip=("process_one_work", "flush_workqueue", "drain_workqueue", "destroy_workqueue")),
    _shape("lockdep", "recursive locking", r"(?:WARNING|INFO): possible recursive locking detected",
           "possible deadlock", _after("is trying to acquire lock", _at_line), _trace),
    _shape("lockdep", "lock inversion", r"(?:WARNING|INFO): possible irq lock inversion dependency detected",
           "possible deadlock", _after("just changed the state of lock", _at_line), _trace),
    _shape("lockdep", "lock order detected", r"(?:WARNING|INFO): \S+-safe -> \S+-unsafe lock order detected",
           "possible deadlock", _after("which became", _stack_after), _trace),
    _shape("lockdep", "inconsistent lock state", r"(?:WARNING|INFO): inconsistent lock state",
           "inconsistent lock state", _trace),
    _shape("lockdep", "suspicious RCU usage", r"(?:WARNING|INFO): suspicious RCU usage",
           "WARNING: suspicious RCU usage", _trace, skip=("rcu", "kmem", "slab")),
    _shape("lockdep", "bad unlock balance", r"(?:WARNING|BUG): bad unlock balance detected!",
           "WARNING: bad unlock balance", _after("is trying to release lock", _next_frame_line), _trace),
    _shape("lockdep", "held lock freed", r"(?:WARNING|BUG): held lock freed!",
           "WARNING: held lock freed", _after("held lock freed", _at_line), _trace),
    _shape("lockdep", "still has locks held", r"(?:WARNING|BUG): .{0,100}still has locks held!",
           "WARNING: still has locks held", _after("still has locks held", _at_line), needs_stack=False),
    _shape("lockdep", "lock held when returning", r"(?:WARNING|BUG): lock held when returning to user space",
           "WARNING: lock held when returning to user space",
           _after("leaving the kernel with locks still held", _at_line), needs_stack=False),
    _shape("lockdep", "Nested lock", r"WARNING: Nested lock was not taken",
           "WARNING: nested lock was not taken", *_OOPS),
    _shape("lockdep", "non-static key", r"INFO: trying to register non-static key",
           "INFO: trying to register non-static key", _trace, skip=("stack", "lock", "IRQ")),
    _shape("lockdep", "Invalid wait context", r"BUG: Invalid wait context",
           "BUG: invalid wait context", _trace, skip=("lock_sock", "release_sock")),
    _shape("spinlock", "BUG: ", r"BUG: (?P<what>(?:spinlock|rwlock) (?:lockup suspected|already unlocked|"
           r"recursion|cpu recursion|bad magic|wrong owner|wrong CPU|trylock failure on UP))",
           "BUG: {what}", _trace, skip=("spin_", "_lock", "_unlock")),
    # --- hangs: the code a CPU is stuck in, or what a blocked task waits for
    _shape("soft lockup", "soft lockup", r"BUG: soft lockup",
           "BUG: soft lockup", *_OOPS, pick=pick_stalled, kind=_HANG),
    _shape("hard lockup", "LOCKUP", r"(?i:(?:NMI )?watchdog: (?:BUG: )?(?:Watchdog detected )?hard LOCKUP)",
           "BUG: hard lockup", *_OOPS, pick=pick_stalled, kind=_HANG),
    _shape("RCU stall", "detected", r"INFO: rcu_\w{1,20} (?:self-)?detected(?: expedited)? stall",
           "INFO: rcu detected stall", _stalled, pick=pick_stalled, kind=_HANG,
           skip=("apic_timer_interrupt", "rcu")),
    _shape("hung task", "INFO: task ", r"INFO: task [^ ]{1,64} blocked (?:in I/O wait )?for more than \d",
           "INFO: task hung", _trace, pick=_pick_hung, kind=_HANG),
    _shape("hung task", "INFO: task ", r"INFO: task [^ ]{1,64} can't die for more than",
           "INFO: task can't die", _trace, skip=("schedule",), kind=_HANG),
    _shape("watchdog reset", "softdog", r"softdog: Initiating system reboot",
           "boot hung: watchdog reset the machine", kind=_HANG, needs_stack=False),
    _shape("workqueue lockup", "workqueue lockup", r"BUG: workqueue lockup",
           "BUG: workqueue lockup", kind=_HANG, needs_stack=False),
    # --- faults: the crashing instruction, then the call trace; one title on every kernel
    _shape("page fault", "NULL pointer dereference",
           r"(?:BUG: (?:unable to handle kernel |Kernel |kernel )|Unable to handle kernel )"
           r"NULL pointer dereference",
           "BUG: kernel NULL pointer dereference", *_OOPS),
    _shape("page fault", "nable to handle",
           r"BUG: (?:unable to handle kernel paging request|unable to handle page fault)|"
           r"Unable to handle kernel (?:paging request|data access|access to user memory)",
           "BUG: unable to handle page fault", *_OOPS,
           skip=("kernel_fault", "mem_abort", "^el1_", "^el1h_")),
    _shape("page fault", "nable to handle kernel", r"(?:BUG: unable|Unable) to handle kernel",
           "BUG: unable to handle kernel", corrupted=True, needs_stack=False),
    _shape("GPF", "general protection", r"general protection fault(?:,|:| for)",
           "general protection fault", *_OOPS),
    _shape("kernel BUG", "kernel BUG at lib/list_debug.c", r"kernel BUG at lib/list_debug\.c",
           "BUG: corrupted list", _trace),
    _shape("kernel BUG", "kernel BUG at mm/usercopy.c", r"kernel BUG at mm/usercopy\.c",
           "BUG: bad usercopy", _trace, skip=("usercopy", "__check")),
    _shape("kernel BUG", "kernel BUG at ", r"kernel BUG at [^ ]+",
           "kernel BUG", *_OOPS, skip=("^skb_",)),
    _shape("trap", "divide", r"divide(?: |_)error: ", "divide error", *_OOPS),
    _shape("trap", "PANIC: double fault", r"PANIC: double fault", "PANIC: double fault", *_OOPS),
    _shape("trap", "stack segment", r"stack segment: ", "stack segment fault", *_OOPS),
    _shape("trap", "int3: ", r"\bint3: ", "int3", *_OOPS),
    _shape("trap", "invalid opcode: ", r"invalid opcode: (?!0000 \[#)", "invalid opcode", *_OOPS),
    _shape("trap", "invalid opcode: 0000", r"invalid opcode: 0000 \[#", "invalid opcode", *_OOPS,
           continues=True),
    _shape("arm fault", "Internal error:", r"Internal error: ", "Internal error", *_OOPS, continues=True),
    _shape("arm fault", "Unhandled fault:", r"Unhandled fault: ", "Unhandled fault", *_OOPS),
    # --- other BUGs
    _shape("BUG", "stack guard page", r"BUG: .{0,64}stack guard page was hit",
           "BUG: stack guard page was hit", *_OOPS, pick=pick_stalled),
    _shape("BUG", "scheduling while atomic", r"BUG: scheduling while atomic",
           "BUG: scheduling while atomic", _trace, skip=("schedule",)),
    _shape("BUG", "sleeping function", r"BUG: sleeping function called from invalid context",
           "BUG: sleeping function called from invalid context", _trace),
    _shape("BUG", "in preemptible", r"BUG: using (?P<what>[a-z_]{1,40})\(\) in preemptible",
           "BUG: using {what}() in preemptible code", _trace,
           skip=("dump_stack", "preemption", "preempt", "debug_", "processor_id", "this_cpu")),
    _shape("BUG", "Bad page state", r"BUG: Bad page (?P<what>state|cache)",
           "BUG: Bad page {what}", _after("page last allocated", _stack_after), _trace,
           skip=("(?:free|put|get|update|release)_page", "free_unref", "^_*folio", "truncate_inode_pages",
                 "page_frag_free", "alloc", "vmap", "page_owner")),
    _shape("BUG", "workqueue leaked lock", r"BUG: workqueue leaked lock or atomic",
           "BUG: workqueue leaked lock or atomic", _after("last function:", _last_function),
           needs_stack=False),
    _shape("BUG", "Bad rss-counter", r"BUG: Bad rss-counter state",
           "BUG: Bad rss-counter state", needs_stack=False),
    _shape("memory leak", "memory leak", r"BUG: memory leak",
           "memory leak", _after("backtrace", _stack_after),
           skip=("kmemleak", "mmap", "kmem", "slab", "alloc", "create_object", "idr_get", "list_lru_init",
                 "kasprintf", "kvasprintf", "pcpu_create", "strdup", "strndup", "memdup")),
    # --- panic(): a driver's own, or the end of an oops whose head was lost
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: (?P<msg>Attempted to kill init!)",
           "kernel panic: Attempted to kill init!", kind=CrashKind.INIT_DIED, panic=True,
           needs_stack=False, frame_in_title=False),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: corrupted stack end",
           "kernel panic: corrupted stack end", _trace, pick=pick_stalled,
           skip=("schedule", "retint_kernel"), panic=True, continues=True),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: (?:[a-z]+: )?(?P<msg>Fatal exception|"
           r"panic_on_warn set|hung_task: blocked tasks|softlockup: hung tasks|Hard LOCKUP)",
           "kernel panic: {msg}", corrupted=True, panic=True, continues=True, needs_stack=False),
    _shape("panic", "Kernel panic",
           rf"Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: {SYM}",
           "kernel panic: stack is corrupted", _header, _trace, skip=("stack_chk",),
           panic=True, continues=True, needs_stack=False),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: kernel stack overflow",
           "kernel stack overflow", _trace, pick=pick_stalled, skip=("bad_stack",),
           panic=True, continues=True),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: ?(?P<msg>.*)$",
           "kernel panic: {msg}", _trace, panic=True, continues=True, frame_in_title=False,
           needs_stack=False),
    # --- generic last: their first lines are also printed inside the reports above; a
    # WARNING's "[module]" after the function in its first line is the guilty module
    _shape("Oops", "Oops", r"\bOops(?: - [a-zA-Z ]{1,40})?: [0-9a-fx]+ \[#\d+\]", "Oops", *_OOPS,
           continues=True),
    _shape("WARNING", "WARNING:", r"WARNING: (?:CPU: \d+ PID: \d+ at [^ ]+ |at [^ ]+ |(?:\[[^]]{0,100}\] )?"
           rf"[^ ]+:\d+ at ){SYM}(?:{OFFSET}(?: \[(?P<module>[A-Za-z0-9_-]+)\])?|\+0x|\(\))",
           "WARNING", _header, *_OOPS, weak=True),
    _shape("WARNING", "WARNING:", r"WARNING: (?:CPU: \d+ PID: \d+ at |at |[^ ]+ at 0x)",
           "WARNING", *_OOPS, weak=True),
)  # fmt: skip

# WARNINGs printed by a checker on behalf of its caller: the file names the checker, the title
# says which, and the checker's own helpers are skipped too.
WARNING_SITES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("lib/debugobjects.c", "WARNING: ODEBUG bug",
     ("debug_", "rcu", "hrtimer_", "timer_", "work_", "percpu_", "vunmap", "vfree", "__free_", "kobject_")),
    ("mm/usercopy.c", "WARNING: bad usercopy", ("usercopy", "__check")),
    ("lib/kobject.c", "WARNING: kobject bug", ("kobject_",)),
    ("fs/proc/generic.c", "WARNING: proc registration bug", ("proc_",)),
    ("lib/refcount.c", "WARNING: refcount bug", ("refcount", "kobject_")),
    ("kernel/locking/lockdep.c", "WARNING: locking bug", ("lock_sock", "release_sock")),
    ("mm/vmalloc.c", "WARNING: zero-size vmalloc", ("vmalloc",)),
    ("mm/slab_common.c", "WARNING: kmalloc bug", ("kmalloc", "krealloc", "slab", "kmem")),
    ("mm/page_alloc.c", "WARNING: kmalloc bug", ("kmalloc", "krealloc", "slab", "kmem")),
    ("drivers/usb/core/urb.c", "WARNING: bad usb_submit_urb",
     ("usb_submit_urb", "usb_start_wait_urb", "usb_bulk_msg", "usb_interrupt_msg", "usb_control_msg")),
)  # fmt: skip
WARNING_SITE_SKIP = {site: any_of(skip) for site, _title, skip in WARNING_SITES}

# Every first line of a report holds one of these (tests/test_crashreport.py checks it on the
# real reports); only lines that do are tried against the shapes.
TRIGGERS = (
    "BUG:", "kernel BUG", "WARNING:", "INFO:", "SAN:", "Kernel panic", "Oops", "general protection",
    "nable to handle", "error:", "opcode:", "int3:", "segment:", "PANIC:", "fault:", "softdog:", "LOCKUP",
)  # fmt: skip
BANNER = "Linux version "  # a boot starts: nothing after it belongs to a report before it
TRIGGER_LINES = 20000  # lines holding a trigger tried as a report's start (a real log has hundreds)
REPORT_LINES = 4000  # own lines of one report looked at (kernel reports are far shorter)
SCAN_LINES = 20000  # lines after a report's start searched for its own lines and its end


def match_shape(text: str) -> tuple[Shape, re.Match[str]] | None:
    """The shape whose first line ``text`` is, if any."""
    if not any(t in text for t in TRIGGERS):
        return None
    for shape in SHAPES:
        if shape.keyword in text:
            m = shape.start.search(text)
            if m is not None:
                return shape, m
    return None


def is_banner(text: str) -> bool:
    return text.startswith(BANNER) and BOOT_BANNER_RE.match(text) is not None
