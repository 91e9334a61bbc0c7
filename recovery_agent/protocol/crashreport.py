"""The kernel's crash report, parsed: one text in, one ``CrashSignature`` out.

This module owns turning a kernel log (a dmesg, a pstore record, a serial console) into a
signature that is the same for the same bug on every machine, kernel version and architecture,
and different for different bugs, in the manner of syzkaller's ``pkg/report``. It is pure: no
I/O, no clock, so the server can run the same rules over a report's excerpt (``rederive``).
``parse_crash(text)``:

1. **Lines.** Every line is cut at ``LINE_LIMIT`` characters before any pattern sees it, and
   its syslog level, timestamp and caller id (``[T123]``/``[C1]``, CONFIG_PRINTK_CALLER) are
   taken off. Report starts are found with ``str.find`` over the whole text (only a line
   holding a trigger word is tried against the shapes), no pattern nests unbounded repetition,
   and the lines and frames looked at per report are bounded: the work grows linearly with the
   text (a 4 MB boot log of one-character lines or of one huge line alike).
2. **Report.** The first line that starts a report of a known shape (``SHAPES``: KASAN, KMSAN,
   KFENCE, KCSAN, UBSAN, lockdep, RCU stalls, hung tasks, lockups, WARNINGs, ``kernel BUG``,
   page faults, GPFs, traps, ``panic()``...). A plain WARNING gives way to a worse report that
   follows it (unless ``panic_on_warn`` made the WARNING the panic's cause); an RCU stall gives
   way to the soft lockup of the same spinning CPU, so one bug keeps one title.
3. **Its lines.** From its first line to its end (``---[ end trace``, the next report, the
   panic it caused); when the log has caller ids, only the lines of the same caller, so the
   output of other tasks interleaved with the report is left out.
4. **Guilty frame.** Each shape says where its candidate frames come from, in order: the
   function its first line names, the crashing ``RIP:``/``pc :``, lockdep's ``at:`` lines, the
   call trace, the stalled task's stack. Unreliable (``?``) and inlined frames are never
   candidates; clone suffixes (``.cold``, ``.isra.0``) and syscall wrappers (``__x64_sys_``)
   are taken off. The first candidate not in ``NEVER_GUILTY`` (the kernel's own reporting,
   sanitizers, locking, list and refcount checks, string helpers, plumbing...) is the guilty
   frame; stalls take the frame just above the dispatcher that ran the stuck code (syscall,
   work item, initcall), hung tasks skip the waiting primitives. The guilty module is the
   ``[module]`` printed after that frame.
5. **Title.** The shape's words and the guilty frame, with nothing per machine in it:
   ``general protection fault in sensor_parse_channel``, ``BUG: KASAN: use-after-free in f``,
   ``possible deadlock in f``, ``kernel panic: <message>``. The same bug gives the same words
   on old and new kernels (4.x ``unable to handle kernel NULL pointer dereference`` and 6.x
   ``kernel NULL pointer dereference`` alike).
6. **Corrupted.** A report cut short or garbled (its head lost, no call trace, no frame where
   its shape needs one) is marked ``corrupted`` and its title names no guessed frame.
7. **Channel file and kind.** The last ``loading channel file <path>`` line before the report
   in the same boot; ``hang`` for lockups, stalls, hung tasks and watchdog resets, ``init_died``
   for ``Attempted to kill init!``, ``kernel_panic`` when a panic follows, else ``oops``.

Every field fits the wire's limits: what is longer is cut and ends with ``…``. The signature
carries ``RULES_VERSION``; ``rederive`` re-makes a signature made by other rules from its
excerpt, so the server groups reports of old and new agents alike.

Which texts to parse, and what to conclude when none holds a report, is ``detect``'s. The lab
parses a run's console with the same function.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush
from itertools import accumulate, chain, islice
from operator import add
from typing import Any

from .wire import CrashKind, CrashSignature

# The rules' version: raise it whenever a change can give a report another title, frame,
# module or corrupted mark (docs/crash-signatures.md).
RULES_VERSION = 2

LINE_LIMIT = 1024  # characters of a line any pattern sees (the kernel prints at most ~1000)
EXCERPT_LIMIT = 8 * 1024  # bytes of the report kept as the signature's excerpt
FRAMES_LIMIT = 256  # candidate frames looked at per report (kernel stacks are far shorter)

# The wire's limits (protocol/wire.py CrashSignature); a longer value is cut and marked.
TITLE_LIMIT = 512
FRAME_LIMIT = 256
MODULE_LIMIT = 64
CHANNEL_FILE_LIMIT = 1024
SOURCE_LIMIT = 256
TRUNCATED = "…"


def fit(value: str, limit: int) -> str:
    """``value`` if it has at most ``limit`` characters, else its start and ``…``."""
    return value if len(value) <= limit else value[: limit - 1] + TRUNCATED


# --------------------------------------------------------------------------- never guilty

# Frames that are never the culprit: the code that reports a crash, checks a rule or carries
# the call, never the code that broke it. One row per group: its name, why, and patterns
# searched in the function name (without clone suffix and syscall wrapper prefix): a plain
# word skips every name that contains it, ``^``/``$`` anchor it.
NEVER_GUILTY: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "reporting",
        "the kernel printing the report (stack dumps, WARN/BUG/panic machinery, task dumps)",
        (
            "dump_stack", "show_stack", "show_trace", "dump_backtrace", "walk_stack", "show_regs",
            "print_address_description", "print_report", "print_usage_bug", "print_circular_bug",
            "print_unlock", "imbalance_bug", "report_bug", "fixup_bug", "__warn", "warn_slowpath",
            "warn_alloc", "warn_bogus", "panic", "print_tainted", "^get_taint$", "sched_show_task",
            "dump_cpu_task", "stack_trace_save", "arch_stack_walk", "stack_trace_consume_entry",
            "hex_dump", "__fortify_report", "^_{0,2}die(?:_body)?$", "^oops_", "assertfail",
            "nmi_cpu_backtrace", "trigger_.*backtrace", "print_cpu_stall", "print_other_cpu_stall",
        ),
    ),
    (
        "sanitizers",
        "KASAN, KMSAN, KCSAN, UBSAN and KFENCE detect the bad access of their caller",
        (
            "__sanitizer", "__asan", "kasan", "hwasan", "__msan", "kmsan", "kcsan_setup_watchpoint",
            "ubsan", "kfence_", "check_memory_region", "check_heap_object", "check_object",
            "read_word_at_a_time", "_nocheck",
        ),
    ),
    (
        "locking and lockdep",
        "locks are taken by the code that misuses them; lockdep only checks",
        (
            "lockdep", "lock_acquire", "lock_release", "lock_class", "mark_lock",
            "(?:reacquire|mark)_held_locks", "raw_spin_rq", "spin_lock", "spin_trylock",
            "spin_unlock", "read_lock", "read_trylock", "write_lock", "write_trylock", "read_unlock",
            "write_unlock", "^down$", "down_read", "down_write", "down_trylock", "up_read",
            "up_write", "^_{0,2}mutex_", "^rt_mutex_", "owner_on_cpu", "osq_lock", "osq_unlock",
            "bh_enable", "bh_disable", "^(?:un)?lock_page", "folio_unlock", "_raw_spin",
            "(?:trace|lockdep)_(?:hard|soft)irq", "__might_sleep", "might_sleep", "__might_resched",
            "might_fault",
        ),
    ),
    (
        "atomics and bit operations",
        "one instruction on the caller's data",
        (
            "atomic(?:64)?_(?:dec|inc|read|set|or|xor|and|add|sub|fetch|xchg|cmpxchg|try)",
            "(?:set|clear|change|test)_bit",
        ),
    ),
    (
        "list, tree, refcount and object checks",
        "debug checks that report the corruption their caller made",
        (
            "^refcount_", "^kref_", "ref_tracker", "list_add", "list_del", "list_replace",
            "list_move", "list_splice", "^rb_", "^__rb_", "debug_object", "timer_is_static_object",
            "work_is_static_object", "^klist_", "kobject_", "__phys_addr", "virt_to_phys", "seqprop_assert",
        ),
    ),
    (
        "memory allocation",
        "allocators and the page cache serve the caller that asked",
        (
            "alloc_page", "k?v?(?:m|z|c)alloc", "krealloc", "kmem_cache", "allocate_slab", "slab_",
            "__alloc_frozen_pages", "folio_alloc", "filemap_alloc_folio", "__filemap_get_folio",
            "find_or_create_page", "do_read_cache_folio", "read_cache_page", "pagecache_get_page",
            "grab_cache_page_write_begin", "^kv?free$", "kfree_skb", "memdup", "strdup", "strndup",
            "ida_free", "xas_(?:start|load|find)", "find_lock_entries", "truncate_inode_pages_range",
        ),
    ),
    (
        "string, memory and formatting helpers",
        "library code that does what its caller asked with the caller's bad data",
        (
            "memcpy", "memcmp", "memset", "memchr", "memmove", "strcmp", "strncmp", "strcpy",
            "strlcpy", "strncpy", "strscpy", "strlen", "strstr", "strnstr", "strnlen", "strchr",
            "string", "^pointer", "snprintf", "scnprintf", "kasprintf", "kvasprintf", "printk",
            "va_format", "dev_(?:info|notice|warn|err|alert|crit|emerg)", "^crc\\d", "crc_itu_t",
        ),
    ),
    (
        "user copies and I/O accessors",
        "fault where the caller's pointer or register is bad",
        (
            "copy_to_user", "copy_from_user", "copy_to_iter", "copy_from_iter", "copy_page_to_iter",
            "copy_page_from_iter", "copy_folio_to_iter", "^copyin$", "^copyout$", "put_user",
            "get_user", "read[bwlq]$", "write[bwlq]$", "logic_in", "logic_out",
        ),
    ),
    (
        "retpolines, tracing and coverage",
        "thunks and hooks compiled into every function",
        ("_indirect_thunk_", "_return_thunk", "perf_trace", "__traceiter", "__bpf_trace"),
    ),
    (
        "traps and fault handling",
        "how the CPU reported the fault, not where it happened",
        (
            "invalid_op", "do_error", "_trap$", "do_trap", "^exc_", "^asm_exc_", "handle_bug",
            "do_int3", "program_check_exception", "program_check_common", "do_kernel_fault",
            "do_translation_fault", "do_mem_abort", "el1_abort", "el1h_64_sync", "do_user_addr_fault",
            "do_kern_addr_fault", "handle_page_fault", "fixup_exception", "kernelmode_fixup_or_oops",
            "bad_area", "page_fault_oops", "make_task_dead", "rewind_stack_",
        ),
    ),
    (
        "syscall, interrupt, work and boot plumbing",
        "how the kernel got to the code: entry, dispatch, interrupts, threads, initcalls",
        (
            "^do_syscall_", "^entry_SYSCALL", "^entry_SYSENTER", "^do_fast_syscall", "^syscall_exit",
            "^ret_from_fork", "^kthread$", "^worker_thread$", "^process_one_work$",
            "^smpboot_thread_fn$", "irq_exit", "^_{0,2}sysvec_",
            "^asm_sysvec_", "apic_timer_interrupt", "^hrtimer_interrupt$", "^__hrtimer_run_queues$",
            "^tick_sched", "^update_process_times$", "^secondary_startup",
            "^cpu_startup_entry$", "^do_idle$", "^rest_init$", "^el0_svc", "^invoke_syscall$",
            "^el0t_64_", "^do_el0_svc",
        ),
    ),
    (
        "scheduling and waiting",
        "where a task waits or wakes others, not why",
        (
            "^_{0,2}schedule", "preempt_schedule", "^io_schedule", "finish_wait", "wait_for_completion",
            "^complete$", "__wake_up",
        ),
    ),
    (
        "work queues and timers",
        "run or cancel the caller's work and timers",
        (
            "del_timer", "flush_work", "__cancel_work_timer", "cancel_work_sync", "try_to_grab_pending",
            "flush_workqueue", "drain_workqueue", "destroy_workqueue", "queue_work", "insert_work",
            "__queue_delayed_work", "queue_delayed_work_on", "lock_timer_base", "__timer_delete_sync",
            "sk_stop_timer_sync", "__mod_timer", "kthread_stop",
        ),
    ),
    (
        "device model, USB and network teardown",
        "generic registration code that warns about or calls back into the driver",
        (
            "add_uevent_var", "get_device_parent", "device_add", "device_del", "device_unregister",
            "device_destroy", "device_release", "devres_release_all", "hwrng_unregister",
            "i2c_del_adapter", "__unregister_client", "device_for_each_child", "rollback_registered",
            "unregister_netdev", "sysfs_remove", "device_remove_file", "tty_unregister_device",
            "^put_device$", "dummy_urb_enqueue", "usb_kill_urb", "usb_kill_anchored_urbs",
            "usb_control_msg", "usb_hcd_submit_urb", "usb_submit_urb",
        ),
    ),
    (
        "inode, dentry and buffer references",
        "drop the last reference the caller held too long or too little",
        (
            "^iput$", "^iput_final$", "^ihold$", "fast_dput", "dput", "drop_nlink", "mark_buffer_dirty",
            "cleanup_srcu_struct", "rhashtable_lookup", "extract_(?:user|iter)_to_sg",
        ),
    ),
)  # fmt: skip


def _any_of(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_NEVER_GUILTY_RE = _any_of([p for _group, _why, patterns in NEVER_GUILTY for p in patterns])


def never_guilty(function: str) -> bool:
    """Whether ``function`` (a normalised name) is in the ``NEVER_GUILTY`` table."""
    return _NEVER_GUILTY_RE.search(function) is not None


# --------------------------------------------------------------------------- line shapes

# Syslog "Jan  1 00:00:00 host kernel: " or a console's "host login: ", "<4>" level (pstore),
# "[    1.234567]" timestamp,
# "[  T123]"/"[ C1]" caller id (CONFIG_PRINTK_CALLER), as the kernel and syslog print them.
_PREFIX_RE = re.compile(
    r"(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S{1,64} kernel: |[^ ]{1,64} login: )?"
    r"(?:<\d{1,3}>)?"
    r"(?:\[ {0,12}\d{1,12}\.\d{1,9}\])?"
    r"(?: ?\[ {0,8}(?P<context>[CT]\d{1,10})\])?"
    r" ?"
)
_TIMESTAMP_RE = re.compile(r"\[ {0,12}\d{1,12}\.\d{1,9}\]")
_SYMBOL = r"[A-Za-z_$][A-Za-z0-9_.$]*"
_SYM = rf"(?P<func>{_SYMBOL})"
_OFFSET = r"\+0x[0-9a-f]+/0x[0-9a-f]+"
_ADDRESS = r"\[<?(?:0x)?[0-9a-f]+>?\]"
# A stack frame: "  sensor_init+0x288/0x1000 [sensor]", "  ? foo+0x1/0x2", 4.x
# "[<ffffffff81234567>] foo+0x1/0x2", "<IRQ>  [<...>] foo+0x1/0x2", powerpc
# "[c0000000] [c0000001] foo+0x1/0x2 (unreliable)", symbolized "foo+0x1/0x2 lib/x.c:12" or
# inlined "foo lib/x.c:12 [inline]".
_FRAME_RE = re.compile(
    r" *(?:<(?:IRQ|EOI|NMI|TASK|SOFTIRQ|#DF)> +)?"
    rf"(?:{_ADDRESS} +){{0,2}}"
    r"(?P<unreliable>\? +)?"
    rf"(?P<func>{_SYMBOL})"
    rf"(?:{_OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?|(?P<inlined> +[^ ]+:\d+ +\[inline\]))"
)
# arm: "[<8011218c>] (unwind_backtrace) from [<8010e300>] (show_stack+0x18/0x1c)" and arm
# since 5.x: "unwind_backtrace from show_stack+0x18/0x1c": the callee, then its caller.
_ARM_FRAME_RE = re.compile(
    rf" *(?:{_ADDRESS} +)?\(?(?P<func>{_SYMBOL})?(?:{_OFFSET})?\)? from (?:{_ADDRESS} +)?"
    rf"\(?(?P<caller>{_SYMBOL})(?:{_OFFSET})?(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# The crashing instruction: x86 "RIP: 0010:f+0x1/0x2 [m]", 4.x "RIP: 0010:[<addr>]  [<addr>]
# f+0x1/0x2", "IP: [<addr>] f+0x1/0x2", arm64 "pc : f+0x1/0x2", arm "PC is at f+0x1/0x2",
# powerpc "NIP [c000...] f+0x1/0x2", riscv "epc : f+0x1/0x2". User-space RIPs have no symbol.
_RIP_RE = re.compile(
    r" *(?:(?:RIP|EIP|IP|pc|epc) {0,3}: {0,3}|NIP +|PC is at )(?:[0-9a-f]{4}:)?"
    rf"(?:{_ADDRESS} +){{0,2}}(?P<func>{_SYMBOL}){_OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# Lockdep's "(&lock){+.+.}-{3:3}, at: f+0x1/0x2" and 4.x "at: [<addr>] f+0x1/0x2".
_AT_RE = re.compile(
    rf"\bat: (?:{_ADDRESS} +)?(?P<func>{_SYMBOL}){_OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# Where a stack starts; it ends where the next one starts or the report ends.
_STACK_STARTS = (
    "Call Trace",
    "Call trace:",
    "Backtrace:",
    "Allocated by task",
    "Freed by task",
    "Allocated:",
    "Freed:",
    "Uninit was stored to memory at",
    "Uninit was created at",
    "created at:",
    "Last potentially related work creation",
    "Second to last potentially related",
)
_BACKTRACE_RE = re.compile(r"(?<!stack )backtrace(?: \(crc [0-9a-f]+\))?:")
_BOOT_BANNER_RE = re.compile(r"Linux version \d")
_CHANNEL_FILE_RE = re.compile(r"loading channel file (?P<path>/?[^ ]+)")
_END_TRACE = "---[ end trace"
_END_PANIC_RE = re.compile(r"---\[ end Kernel panic|Rebooting in \d+ seconds")
_FAULT_INJECTION_RE = re.compile(rf"^ *(?:{_ADDRESS} +)?should_fail(?:slab)?(?:\.[a-z0-9.]+)?\+0x")
# A syscall's entry has other names on other architectures and kernel versions:
# __x64_sys_mount, __arm64_sys_mount, __se_sys_mount, __do_sys_mount, SyS_mount, ksys_mount.
# All are the syscall "mount": the architecture's, then the wrapper's, prefix is taken off.
_ARCH_PREFIX_RE = re.compile(r"^__(?:x64|ia32|x32|arm64|arm|riscv|s390x?|powerpc|ppc)_")
_SYSCALL_PREFIX_RE = re.compile(r"(?:compat_)?(?:__se_|__do_)?(?:_{0,4}sys_|SyS_|SYSC_|ksys_)(?=[a-z0-9_]+$)")


def normalise_function(name: str) -> str:
    """One name for a function on every build and architecture: ``widget_read_rate.constprop.0``
    and ``f.cold`` lose the compiler's clone suffix (C names have no dot), ``__x64_sys_mount``
    and ``__se_sys_mount`` are the syscall ``mount``."""
    name = name.partition(".")[0]
    bare = _SYSCALL_PREFIX_RE.sub("", _ARCH_PREFIX_RE.sub("", name, count=1), count=1)
    return bare if bare and bare != name and _is_syscall_entry(name) else name


def _is_syscall_entry(name: str) -> bool:
    return _SYSCALL_PREFIX_RE.match(_ARCH_PREFIX_RE.sub("", name, count=1)) is not None


# --------------------------------------------------------------------------- lines


@dataclass(frozen=True, slots=True)
class _Line:
    raw: str  # as logged, cut at LINE_LIMIT, without CR
    text: str  # without level, timestamp and caller id
    context: str  # "T123"/"C1" (CONFIG_PRINTK_CALLER) or ""


def _parse_line(raw: str) -> _Line:
    raw = raw[:LINE_LIMIT].rstrip("\r")
    m = _PREFIX_RE.match(raw)
    assert m is not None  # every part of the prefix is optional
    return _Line(raw, raw[m.end() :], m.group("context") or "")


def strip_prefix(line: str) -> str:
    """A log line without its syslog level, timestamp and caller id."""
    return _parse_line(line).text


class _Log:
    """A kernel log's lines, each cut and parsed only when a rule reads it. Searches over the
    whole log (``lines_with``) use ``str.find``, so a log of millions of lines costs no
    Python work per line, only per line that holds what is searched for."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.raws = text.split("\n")
        # offset of each line's end (its "\n", or the end of the text for the last line)
        self._ends = list(map(add, accumulate(map(len, self.raws)), range(len(self.raws))))
        self._parsed: dict[int, _Line] = {}

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> _Line:
        line = self._parsed.get(i)
        if line is None:
            line = self._parsed[i] = _parse_line(self.raws[i])
        return line

    def _start(self, i: int) -> int:
        return self._ends[i - 1] + 1 if i > 0 else 0

    def lines_with(self, needles: Sequence[str], start: int = 0) -> Iterator[int]:
        """Indices of the lines from ``start`` on whose first ``LINE_LIMIT`` characters hold
        one of ``needles``, in order. Each needle is searched for once over the log."""
        if start >= len(self.raws):
            return
        heap = [(pos, n) for n in needles if (pos := self.text.find(n, self._start(start))) != -1]
        heapify(heap)
        while heap:
            i = bisect_left(self._ends, heap[0][0])
            if any(n in self[i].raw for n in needles):
                yield i
            after = self._ends[i] + 1
            while heap and heap[0][0] < after:
                _pos, n = heappop(heap)
                pos = self.text.find(n, after)
                if pos != -1:
                    heappush(heap, (pos, n))

    def last_with(self, needle: str, before: int) -> int | None:
        """Index of the last line before line ``before`` that holds ``needle``."""
        end = self._start(before)
        while end > 0:
            pos = self.text.rfind(needle, 0, end)
            if pos == -1:
                return None
            i = bisect_left(self._ends, pos)
            if needle in self[i].raw:
                return i
            end = self._start(i)
        return None


@dataclass(frozen=True, slots=True)
class _Frame:
    function: str  # normalised
    module: str | None
    line: int  # index of the line it came from


def _frame(text: str, index: int) -> _Frame | None:
    """The frame a call-trace line names, or None for other lines, unreliable (``?``,
    ``(unreliable)``) and inlined frames."""
    m = _FRAME_RE.match(text)
    if m is None:
        return None
    if m.group("unreliable") or m.group("inlined") or text.endswith("(unreliable)"):
        return None
    return _Frame(normalise_function(m.group("func")), m.group("module"), index)


def _frames_of(text: str, index: int) -> list[_Frame]:
    frame = _frame(text, index)
    if frame is not None:
        return [frame]
    if " from " in text:
        m = _ARM_FRAME_RE.match(text)
        if m is not None:
            out = [_Frame(normalise_function(m.group("func")), None, index)] if m.group("func") else []
            return [*out, _Frame(normalise_function(m.group("caller")), m.group("module"), index)]
    return []


def _is_stack_start(text: str) -> bool:
    return any(s in text for s in _STACK_STARTS) or (
        "backtrace" in text and _BACKTRACE_RE.search(text) is not None
    )


# --------------------------------------------------------------------------- report shapes


@dataclass
class _Report:
    """One report found in a log: its shape, its first line and the lines that are its own."""

    shape: Shape
    match: re.Match[str]
    lines: _Log  # the whole log
    index: int  # the report's first line
    own: list[int] = field(default_factory=list)  # indices of the report's own lines

    @property
    def context(self) -> str:
        return self.lines[self.index].context


# A source of candidate frames, in the order they are tried.
FrameSource = Callable[[_Report], Iterator[_Frame]]
# Picks the guilty frame from all candidates (skipped ones included, for anchors).
Picker = Callable[[list[_Frame], re.Pattern[str] | None], _Frame | None]


def _first_not_skipped(frames: list[_Frame], skip: re.Pattern[str] | None) -> _Frame | None:
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
        object.__setattr__(self, "skip_re", _any_of(self.skip) if self.skip else None)


# --- frame sources -------------------------------------------------------------------


_HEX_RE = re.compile(r"[0-9a-f]{8,16}")


def _header(r: _Report) -> Iterator[_Frame]:
    """The function the report's first line names (``BUG: KASAN: ... in f+0x1/0x2``)."""
    func = r.match.groupdict().get("func")
    if func and not _HEX_RE.fullmatch(func):  # "corrupted in: ffffffff8343632e": no symbol
        yield _Frame(normalise_function(func), r.match.groupdict().get("module"), r.index)


def _rip(r: _Report) -> Iterator[_Frame]:
    """The crashing instruction's function (``RIP:``, ``pc :``, ``IP:``, ``NIP``)."""
    for i in r.own:
        m = _RIP_RE.match(r.lines[i].text)
        if m is not None:
            yield _Frame(normalise_function(m.group("func")), m.group("module"), i)
            return


def _trace(r: _Report) -> Iterator[_Frame]:
    """The first call trace of the report, up to the next stack's start."""
    for pos, i in enumerate(r.own):
        text = r.lines[i].text
        if _is_stack_start(text):
            yield from _frames_of(text, i)  # very old kernels: "Call Trace: [<addr>] f+0x1/0x2"
            yield from _stack_after(r, pos)
            return


def _frames_after_header(r: _Report) -> Iterator[_Frame]:
    """The frames printed right after the first line (KMSAN, KFENCE: no "Call Trace:"), up to
    the empty line or stack start that follows them."""
    seen = False
    for i in r.own[1:]:
        text = r.lines[i].text
        frames = _frames_of(text, i)
        if not frames:
            if seen and (text.strip() == "" or _is_stack_start(text)):
                return
            continue
        seen = True
        yield from frames


_MARKERS: set[str] = set()  # every _after() marker: lines an excerpt must keep


def _after(marker: str, source: Callable[[_Report, int], Iterator[_Frame]]) -> FrameSource:
    _MARKERS.add(marker)

    def frames(r: _Report) -> Iterator[_Frame]:
        for pos, i in enumerate(r.own):
            if marker in r.lines[i].text:
                yield from source(r, pos)
                return

    return frames


def _at_line(r: _Report, pos: int) -> Iterator[_Frame]:
    """The first lockdep ``at: f+0x1/0x2`` at or after own-line position ``pos``."""
    for i in r.own[pos:]:
        m = _AT_RE.search(r.lines[i].text)
        if m is not None:
            yield _Frame(normalise_function(m.group("func")), m.group("module"), i)
            return


_LAST_FUNCTION_RE = re.compile(rf"last function: {_SYM}")


def _last_function(r: _Report, pos: int) -> Iterator[_Frame]:
    """The work function a workqueue report names (``last function: f``)."""
    m = _LAST_FUNCTION_RE.search(r.lines[r.own[pos]].text)
    if m is not None:
        yield _Frame(normalise_function(m.group("func")), None, r.own[pos])


def _chain(r: _Report, pos: int) -> Iterator[_Frame]:
    """The frames of lockdep's dependency chain, after the held lock's ``at:`` line."""
    for k, i in enumerate(r.own[pos:], pos):
        if _AT_RE.search(r.lines[i].text):
            yield from _stack_after(r, k)
            return


def _next_frame_line(r: _Report, pos: int) -> Iterator[_Frame]:
    """The first frame line after own-line position ``pos`` (``[<addr>] f+0x1/0x2``)."""
    for i in r.own[pos + 1 :]:
        frames = _frames_of(r.lines[i].text, i)
        if frames:
            yield frames[0]
            return


def _stack_after(r: _Report, pos: int) -> Iterator[_Frame]:
    """Frames from own-line position ``pos`` on, up to the next stack's start."""
    for i in r.own[pos + 1 :]:
        text = r.lines[i].text
        if _is_stack_start(text):
            return
        yield from _frames_of(text, i)


_INTERRUPT_MARKERS = ("apic_timer_interrupt", "Exception stack", "el1h_64_irq", "<EOI>")


def _stalled(r: _Report) -> Iterator[_Frame]:
    """The stalled CPU's own stack in an RCU stall or lockup report: after the timer
    interrupt that found it (its RIP, then what the interrupt interrupted), else after the
    first kernel RIP; never the stall printer's own stack before it."""
    own = r.own
    start = None
    for pos, i in enumerate(own):
        text = r.lines[i].text
        if any(m in text for m in _INTERRUPT_MARKERS):
            start = pos
            if "<EOI>" in text:
                yield from _frames_of(text, i)
            break
    if start is None:
        for pos, i in enumerate(own):
            if _RIP_RE.match(r.lines[i].text):
                start = pos - 1
                break
    if start is None:
        return
    yielded = False
    for i in own[start + 1 :]:
        text = r.lines[i].text
        if yielded and text.startswith("rcu:"):
            return  # the stall printer again: the grace-period kthread's stack follows
        m = _RIP_RE.match(text)
        if m is not None:
            yield _Frame(normalise_function(m.group("func")), m.group("module"), i)
            yielded = True
            continue
        if _is_stack_start(text) and "Call Trace" not in text and "Call trace" not in text:
            return
        for f in _frames_of(text, i):
            yielded = True
            yield f


# --- pickers -------------------------------------------------------------------------

# Stalls: where a CPU loops, the report stops it at a random place inside the loop; the frame
# just above the code that dispatched the looping work names the bug every time. These
# dispatchers (syscall entry, file and socket operations, work items, softirqs, timers, module
# initcalls, page faults) are the anchors.
_STALL_ANCHORS = _any_of(
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


def _pick_stalled(frames: list[_Frame], skip: re.Pattern[str] | None) -> _Frame | None:
    """The last frame before the first dispatcher (``_STALL_ANCHORS``) that is not skipped; a
    stall in ``smp_call_function`` is one bug wherever the other CPU was."""
    previous: _Frame | None = None
    for f in frames:
        if _STALL_ANCHORS.search(f.function):
            if "smp_call_function" in f.function:
                return _Frame("smp_call_function", f.module, f.line)
            return previous or f
        if not _skipped(f.function, skip):
            previous = f
    return _first_not_skipped(frames, skip)


# Hung tasks: a task blocked on a lock or an RCU grace period is a victim; all such victims of
# one culprit are one bug (rtnl_lock, synchronize_rcu), the rest are named by the first frame
# that is not waiting.
_HUNG_WAITING = _any_of(
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


def _pick_hung(frames: list[_Frame], skip: re.Pattern[str] | None) -> _Frame | None:
    for f in frames:
        for anchor, bucket in _HUNG_BUCKETS:
            if anchor in f.function:
                return _Frame(bucket, f.module, f.line)
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
    _shape("KASAN", "KASAN:", rf"BUG: KASAN: (?P<what>double-free or invalid-free|[a-z-]+) in {_SYM}",
           "BUG: KASAN: {what}", _header, _trace,
           skip=("kernel_fault", "tag_check", "mem_abort", "^el1_", "^el1h_")),
    _shape("KASAN", "KASAN:", r"BUG: KASAN: (?P<what>[a-z-]+)",
           "BUG: KASAN: {what}", needs_stack=False),
    _shape("KMSAN", "KMSAN:", rf"BUG: KMSAN: (?P<what>[a-z-]+) in {_SYM}",
           "BUG: KMSAN: {what}", _frames_after_header, _header, needs_stack=False,
           skip=("alloc_skb", "netlink_ack", "netlink_rcv_skb", "_encrypt$", "^(?:crypto|cipher|drbg|rng)_",
                 "usb_submit_urb", "usb_start_wait_urb", "usb_bulk_msg", "usb_interrupt_msg")),
    _shape("KFENCE", "KFENCE:",
           r"BUG: KFENCE: (?P<what>(?:use-after-free|out-of-bounds|invalid) (?:read|write)"
           rf"|invalid free|memory corruption) in {_SYM}",
           "BUG: KFENCE: {what}", _header, _frames_after_header, needs_stack=False),
    _shape("KCSAN", "KCSAN:",
           rf"BUG: KCSAN: (?P<what>[a-z-]+(?:: [a-z-]+)?) in {_SYM} / (?P<other>{_SYMBOL})",
           "BUG: KCSAN: {what} in {func} / {other}", _header, needs_stack=False, frame_in_title=False),
    _shape("KCSAN", "KCSAN:", rf"BUG: KCSAN: (?P<what>[a-z-]+(?:: [a-z-]+)?) in {_SYM}",
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
           "BUG: soft lockup", *_OOPS, pick=_pick_stalled, kind=_HANG),
    _shape("hard lockup", "LOCKUP", r"(?i:(?:NMI )?watchdog: (?:BUG: )?(?:Watchdog detected )?hard LOCKUP)",
           "BUG: hard lockup", *_OOPS, pick=_pick_stalled, kind=_HANG),
    _shape("RCU stall", "detected", r"INFO: rcu_\w{1,20} (?:self-)?detected(?: expedited)? stall",
           "INFO: rcu detected stall", _stalled, pick=_pick_stalled, kind=_HANG,
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
           "BUG: stack guard page was hit", *_OOPS, pick=_pick_stalled),
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
           "kernel panic: corrupted stack end", _trace, pick=_pick_stalled,
           skip=("schedule", "retint_kernel"), panic=True, continues=True),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: (?:[a-z]+: )?(?P<msg>Fatal exception|"
           r"panic_on_warn set|hung_task: blocked tasks|softlockup: hung tasks|Hard LOCKUP)",
           "kernel panic: {msg}", corrupted=True, panic=True, continues=True, needs_stack=False),
    _shape("panic", "Kernel panic",
           rf"Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: {_SYM}",
           "kernel panic: stack is corrupted", _header, _trace, skip=("stack_chk",),
           panic=True, continues=True, needs_stack=False),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: kernel stack overflow",
           "kernel stack overflow", _trace, pick=_pick_stalled, skip=("bad_stack",),
           panic=True, continues=True),
    _shape("panic", "Kernel panic", r"Kernel panic - not syncing: ?(?P<msg>.*)$",
           "kernel panic: {msg}", _trace, panic=True, continues=True, frame_in_title=False,
           needs_stack=False),
    # --- generic last: their first lines are also printed inside the reports above; a
    # WARNING's "[module]" after the function in its first line is the guilty module
    _shape("Oops", "Oops", r"\bOops(?: - [a-zA-Z ]{1,40})?: [0-9a-fx]+ \[#\d+\]", "Oops", *_OOPS,
           continues=True),
    _shape("WARNING", "WARNING:", r"WARNING: (?:CPU: \d+ PID: \d+ at [^ ]+ |at [^ ]+ |(?:\[[^]]{0,100}\] )?"
           rf"[^ ]+:\d+ at ){_SYM}(?:{_OFFSET}(?: \[(?P<module>[A-Za-z0-9_-]+)\])?|\+0x|\(\))",
           "WARNING", _header, *_OOPS, weak=True),
    _shape("WARNING", "WARNING:", r"WARNING: (?:CPU: \d+ PID: \d+ at |at |[^ ]+ at 0x)",
           "WARNING", *_OOPS, weak=True),
)  # fmt: skip

# WARNINGs printed by a checker on behalf of its caller: the file names the checker, the title
# says which, and the checker's own helpers are skipped too.
_WARNING_SITES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
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
_WARNING_SITE_SKIP = {site: _any_of(skip) for site, _title, skip in _WARNING_SITES}

# Every first line of a report holds one of these (tests/test_crashreport.py checks it on the
# real reports); only lines that do are tried against the shapes.
_TRIGGERS = (
    "BUG:", "kernel BUG", "WARNING:", "INFO:", "SAN:", "Kernel panic", "Oops", "general protection",
    "nable to handle", "error:", "opcode:", "int3:", "segment:", "PANIC:", "fault:", "softdog:", "LOCKUP",
)  # fmt: skip
_BANNER = "Linux version "  # a boot starts: nothing after it belongs to a report before it
TRIGGER_LINES = 20000  # lines holding a trigger tried as a report's start (a real log has hundreds)
REPORT_LINES = 4000  # own lines of one report looked at (kernel reports are far shorter)
SCAN_LINES = 20000  # lines after a report's start searched for its own lines and its end


def _match_shape(text: str) -> tuple[Shape, re.Match[str]] | None:
    """The shape whose first line ``text`` is, if any."""
    if not any(t in text for t in _TRIGGERS):
        return None
    for shape in SHAPES:
        if shape.keyword in text:
            m = shape.start.search(text)
            if m is not None:
                return shape, m
    return None


def _is_banner(text: str) -> bool:
    return text.startswith(_BANNER) and _BOOT_BANNER_RE.match(text) is not None


# --------------------------------------------------------------------------- finding a report


def _find_report(log: _Log) -> _Report | None:
    """The first report; a plain WARNING only if no worse report follows it in the same boot,
    or if the WARNING's own task goes on to panic because of it (``panic_on_warn``)."""
    weak: _Report | None = None
    worse: _Report | None = None  # after the WARNING, printed by another task
    for i in islice(log.lines_with((*_TRIGGERS, _BANNER)), TRIGGER_LINES):
        line = log[i]
        if weak is not None and _is_banner(line.text):
            break
        found = _match_shape(line.text)
        if found is None:
            continue
        shape, m = found
        if shape.weak:
            weak = weak or _Report(shape, m, log, i)
            continue
        if weak is not None:
            same_task = not (weak.context and line.context) or weak.context == line.context
            if shape.panic and "panic_on_warn" in line.text and same_task:
                return weak  # panic_on_warn: the WARNING is the cause of the panic
            if not same_task:
                worse = worse or _report(shape, m, log, i)
                continue
        return worse or _report(shape, m, log, i)
    return worse or weak


def _report(shape: Shape, m: re.Match[str], log: _Log, i: int) -> _Report:
    if shape.name == "RCU stall":
        return _prefer_soft_lockup(log, i) or _Report(shape, m, log, i)
    return _Report(shape, m, log, i)


def _prefer_soft_lockup(log: _Log, start: int) -> _Report | None:
    """A CPU spinning in a driver trips the RCU stall detector (about 21 s) and the soft
    lockup detector (about 22 s and more) in either order; both reports name the same code.
    Report the soft lockup whenever the same boot's log holds one, so that one bug gives one
    title however long the machine ran before it was reset."""
    for j in log.lines_with(("soft lockup", _BANNER), start + 1):
        text = log[j].text
        if _is_banner(text):
            return None
        found = _match_shape(text)
        if found is not None and found[0].name == "soft lockup":
            return _Report(found[0], found[1], log, j)
    return None


def _own_lines(r: _Report) -> list[int]:
    """The report's own lines: from its first line to its end trace, the next report, the
    panic that ends it or the next boot; only the lines of its caller when the log has caller
    ids (and, after "Sending NMI", the other CPUs' backtraces it asked for). At most
    ``REPORT_LINES`` of them, found among the next ``SCAN_LINES`` lines."""
    log = r.lines
    context = r.context
    own = [r.index]
    seen_stack = False
    nmi = False
    for j in range(r.index + 1, min(len(log), r.index + SCAN_LINES)):
        line = log[j]
        text = line.text
        if context and line.context != context and not (nmi and line.context.startswith("C")):
            continue
        if _is_banner(text):
            break
        found = _match_shape(text)
        if found is not None:
            shape = found[0]
            if shape.panic:
                if seen_stack or r.shape.panic:
                    break
                continue  # a WARNING whose only stack is the panic_on_warn panic's
            if not shape.continues:
                break
        if "Sending NMI from CPU" in text:
            nmi = True
        if _is_stack_start(text):
            seen_stack = True
        own.append(j)
        if _END_TRACE in text or len(own) == REPORT_LINES:
            break
    return own


# --------------------------------------------------------------------------- the signature


@dataclass(frozen=True)
class _Verdict:
    title: str
    frame: str | None
    module: str | None
    corrupted: bool
    decisive: frozenset[int]  # lines whose frames decided: the guilty one and its anchor


def _judge(r: _Report) -> _Verdict:
    shape = r.shape
    groups = {k: v or "" for k, v in r.match.groupdict().items()}
    skip = shape.skip_re
    prefix = shape.title
    if shape.weak:
        site = next((s for s in _WARNING_SITES if s[0] in r.lines[r.index].text), None)
        if site is not None:
            prefix = site[1]
            skip = _WARNING_SITE_SKIP[site[0]]
    if "what" in groups:
        groups["what"] = _what(shape, groups["what"])
    for name in ("func", "other"):
        if groups.get(name):
            groups[name] = fit(normalise_function(groups[name]), FRAME_LIMIT)
    if "msg" in groups:
        groups["msg"] = normalise_panic_message(groups["msg"])
    prefix = prefix.format(**groups)

    candidates = list(islice(chain.from_iterable(source(r) for source in shape.sources), FRAMES_LIMIT))
    chosen = shape.pick(candidates, skip) if shape.sources else None
    decisive = {r.index}
    if chosen is not None:
        decisive.add(chosen.line)
        later = [f for f in candidates if f.line > chosen.line and _STALL_ANCHORS.search(f.function)]
        if shape.pick is _pick_stalled and later:
            decisive.add(later[0].line)

    corrupted = shape.corrupted or (bool(shape.sources) and shape.frame_in_title and chosen is None)
    evidence = _stack_evidence(r)
    if evidence is not None:
        decisive.add(evidence)
    elif not corrupted and shape.needs_stack and shape.sources:
        corrupted = True
    if _TIMESTAMP_RE.search(r.lines[r.index].text, r.match.start()):
        corrupted = True  # another line was printed into the middle of the first one
    if any(_FAULT_INJECTION_RE.match(r.lines[i].text) for i in r.own):
        corrupted = True  # a fault-injection stack is mixed into this one

    frame = fit(chosen.function, FRAME_LIMIT) if chosen is not None else None
    module = fit(chosen.module, MODULE_LIMIT) if chosen is not None and chosen.module else None
    title = f"{prefix} in {frame}" if frame and shape.frame_in_title else prefix
    return _Verdict(fit(title, TITLE_LIMIT), frame, module, corrupted, frozenset(decisive))


def _what(shape: Shape, what: str) -> str:
    if shape.name == "KASAN" and "free" in what and "after" not in what:
        return "invalid-free"  # double-free, invalid-free and either-or are one kind of bug
    if shape.name == "UBSAN":
        return what.strip().lower().replace(" ", "-")
    return what


def _stack_evidence(r: _Report) -> int | None:
    """The first reliable frame of a call trace, among the first lines after the trace's
    start (unreliable ``?`` frames left out, as if not printed), or None: no usable trace."""
    for pos, i in enumerate(r.own):
        if not _is_stack_start(r.lines[i].text):
            continue
        looked = 0
        for j in r.own[pos + 1 :]:
            text = r.lines[j].text
            m = _FRAME_RE.match(text)
            if m is not None and m.group("unreliable"):
                continue
            if _frames_of(text, j) or "(stack is not available)" in text:
                return j
            looked += 1
            if looked == 15 or _is_stack_start(text):
                break
    return None


def _panic_after(r: _Report) -> int | None:
    """Index of the ``Kernel panic`` line the report led to in the same boot, if any."""
    for j in r.lines.lines_with(("Kernel panic - not syncing", _BANNER), r.index + 1):
        text = r.lines[j].text
        if _is_banner(text):
            return None
        if "Kernel panic - not syncing" in text and "end Kernel panic" not in text:
            return j
    return None


def _excerpt_end(r: _Report, panic: int | None) -> int:
    """Index one past the excerpt's last line: the end of the panic if the kernel panicked
    (``---[ end Kernel panic`` or ``Rebooting in``), else the report's own last line."""
    end = r.own[-1] + 1
    if panic is None:
        return end
    limit = min(len(r.lines), max(end, panic + 1) + SCAN_LINES)
    for j in r.lines.lines_with(("---[ end Kernel panic", "Rebooting in ", _BANNER), panic):
        if j >= limit or _is_banner(r.lines[j].text):
            return max(end, min(j, limit))
        if _END_PANIC_RE.search(r.lines[j].text):
            return max(end, j + 1)
    return max(end, limit)


# Lines a report prints that no rule reads: registers, code bytes, raw stack words, unreliable
# frames. The excerpt leaves them out when the whole report does not fit.
_NOISE_RE = re.compile(
    r" *(?:(?:R[A-Z0-9]{1,3}|E[A-Z]{2}|[CDFGE]S|CR\d|DR\d|[xr]\d{1,2}|[a-z]\d{1,2}|sp|lr|fp|ip|gp|tp"
    r"|t\d|s\d{1,2}|a\d|ra|psr|pc) {0,3}: {0,3}[0-9a-fA-F]{8,}(?: |$)"
    r"|Code: |Stack: |[0-9a-f]{4,16}: [0-9a-f]{8}|(?:\[<[0-9a-f]+>\] +)?\? )"
)


def _excerpt(r: _Report, end: int, decisive: frozenset[int]) -> str:
    """The report as logged, from its first line to ``end``, in at most ``EXCERPT_LIMIT``
    bytes, such that parsing it again gives the same signature (``rederive``). When it does not
    fit: only its own lines (not those other tasks printed in between); then without the lines
    no rule reads (registers, code bytes, unreliable frames); then the lines that decided the
    signature (markers, the guilty frame and its anchor) and as many others from the start as
    fit, the cut marked."""
    lines = r.lines
    everything = list(range(r.index, end))
    own = set(r.own)
    tail_start = r.own[-1] + 1
    mine = [i for i in everything if i in own or (i >= tail_start and lines[i].context in ("", r.context))]
    quiet = [i for i in mine if i == r.index or not _NOISE_RE.match(lines[i].text)]
    for chosen in (everything, mine, quiet):
        if _size(lines, chosen) <= EXCERPT_LIMIT:
            return "\n".join(lines[i].raw for i in chosen)
    must = [i for i in quiet if i in decisive or _structural(lines[i].text)]
    budget = EXCERPT_LIMIT - 80 - _size(lines, must)
    keep = set(must)
    for i in quiet:
        if i in keep:
            continue
        cost = _size(lines, [i])
        if cost > budget:
            break
        keep.add(i)
        budget -= cost
    kept = [lines[i].raw for i in sorted(keep)]
    size = _size_raw(kept)
    while kept and size > EXCERPT_LIMIT - 80:  # the decisive lines alone are too long: cut them
        size -= _size_raw([kept.pop()])
    kept.append(f"{TRUNCATED} (excerpt: {len(quiet) - len(keep)} lines of the report left out)")
    return "\n".join(kept)


def _size(lines: _Log, indices: Sequence[int]) -> int:
    return _size_raw([lines[i].raw for i in indices])


def _size_raw(raws: Sequence[str]) -> int:
    return sum(len(raw.encode("utf-8", errors="replace")) + 1 for raw in raws)


def _structural(text: str) -> bool:
    """A line the rules read for its words, not its frame: stack starts, RIPs, lockdep's
    ``at:`` and markers, interrupt and NMI markers, the stall printer's lines, panics."""
    return (
        _is_stack_start(text)
        or _RIP_RE.match(text) is not None
        or "at: " in text
        or any(m in text for m in _MARKERS)
        or any(m in text for m in _INTERRUPT_MARKERS)
        or text.startswith("rcu:")
        or "NMI" in text
        or "Kernel panic" in text
        or _END_TRACE in text
    )


def parse_crash(text: str, source: str = "") -> CrashSignature | None:
    """The signature of the first report in ``text`` (a dmesg, pstore record or console log),
    or ``None`` if it holds none. ``source`` names where the text came from."""
    log = _Log(text)
    report = _find_report(log)
    if report is None:
        return None
    report.own = _own_lines(report)
    shape = report.shape
    verdict = _judge(report)

    panic = report.index if shape.panic else _panic_after(report)
    if shape.kind is not None:
        kind = shape.kind
    else:
        kind = CrashKind.KERNEL_PANIC if panic is not None else CrashKind.OOPS
    if kind is CrashKind.KERNEL_PANIC and shape.panic and _HANG_PANIC.search(log[report.index].text):
        kind = CrashKind.HANG  # e.g. "softlockup: hung tasks" with the report itself lost

    return CrashSignature(
        kind=kind,
        title=verdict.title,
        guilty_frame=verdict.frame,
        guilty_module=verdict.module,
        channel_file=_channel_file(log, report.index),
        source=fit(source, SOURCE_LIMIT),
        excerpt=_excerpt(report, _excerpt_end(report, panic), verdict.decisive),
        corrupted=verdict.corrupted,
        rules_version=RULES_VERSION,
    )


def _channel_file(log: _Log, before: int) -> str | None:
    """The last ``loading channel file <path>`` before the report, in the same boot (a file
    loaded in an earlier boot of a multi-boot log is not this crash's)."""
    i = log.last_with("loading channel file ", before)
    if i is None:
        return None
    banner = log.last_with(_BANNER, before)
    if banner is not None and banner > i and _is_banner(log[banner].text):
        return None
    line = log[i]
    m = _CHANNEL_FILE_RE.search(line.text)
    if m is None:
        return None
    path = m.group("path").lstrip("/")
    if m.end() == len(line.text) and len(log.raws[i].rstrip("\r")) > LINE_LIMIT:
        path = path[:-1] + TRUNCATED  # the line was cut at LINE_LIMIT inside the path
    return fit(path, CHANNEL_FILE_LIMIT)


_HANG_PANIC = re.compile(r"softlockup|hard ?lockup|hung_task|rcu|watchdog", re.IGNORECASE)


def rederive(sig: CrashSignature) -> CrashSignature:
    """``sig`` as these rules make it: a signature made by another version of the rules (an
    older or newer agent) is re-made from its excerpt, keeping what only the whole log knew
    (kind, channel file, source). Unchanged when the versions match or the excerpt holds no
    report (a hang named from the boot progress log, a boot with no crash record)."""
    if sig.rules_version == RULES_VERSION or not sig.excerpt:
        return sig
    again = parse_crash(sig.excerpt, sig.source)
    if again is None:
        return sig
    return sig.model_copy(
        update={
            "title": again.title,
            "guilty_frame": again.guilty_frame,
            "guilty_module": again.guilty_module,
            "corrupted": again.corrupted,
            "rules_version": RULES_VERSION,
        }
    )


# --------------------------------------------------------------------------- normalisation

_OFFSET_RE = re.compile(_OFFSET)
_COMM_PID_RE = re.compile(r"\[[^]\s]{1,64}:\d{1,10}\]")  # [insmod:63]
_CPU_RE = re.compile(r"CPU#? ?\d+")
_PARENS_RE = re.compile(r"\([^()]*\)")  # (0,0), (error -2)
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:0x[0-9a-fA-F]+|[0-9a-f]{8,}|\d+(?:\.\d+)?(?:s|ms|us|ns|[KMG]i?B|kB|[KMG]|%)?)(?!\w)"
)
_SPACES_RE = re.compile(r"\s+")


def normalise_title(text: str) -> str:
    """Remove what differs between machines and boots: timestamps, addresses, offsets,
    ``comm:pid`` tags, CPU numbers, numbers; keep words such as ``ext4`` or ``rcu_preempt``.
    Linear in the text, which is cut at ``LINE_LIMIT`` first."""
    text = text[:LINE_LIMIT]
    text = _TIMESTAMP_RE.sub(" ", text)
    text = _OFFSET_RE.sub("", text)
    text = _COMM_PID_RE.sub(" ", text)
    text = _CPU_RE.sub("CPU", text)
    text = _PARENS_RE.sub(lambda m: " " if any(c.isdigit() for c in m.group()) else m.group(), text)
    words = [w for w in text.split() if not ("=" in w and any(c.isdigit() for c in w.partition("=")[2]))]
    text = _NUMBER_RE.sub("", " ".join(words))
    text = _SPACES_RE.sub(" ", text).strip()
    return text.rstrip(" ,:;-")


def normalise_panic_message(msg: str) -> str:
    """The message of ``Kernel panic - not syncing: <msg>``, per machine details removed."""
    for fixed in ("VFS: Unable to mount root fs", "VFS: Cannot open root device", "Attempted to kill init!"):
        if msg.startswith(fixed):
            return fixed  # device names and exit codes differ between machines
    return normalise_title(msg)
