"""The kernel's crash report, parsed: one text in, one ``CrashSignature`` out.

This package owns turning a kernel log (a dmesg, a pstore record, a serial console) into a
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

Modules, in the order a log goes through them: ``lines`` (the limits, a log's lines and frames,
title normalisation), ``neverguilty`` (the table of frames that are never the culprit),
``shapes`` (the table of report shapes, their frame sources and pickers), ``parse`` (finding
the report, judging it, the signature). All of them are one set of rules: a change to any can
change a title, so any such change raises ``RULES_VERSION``.
"""

from .lines import (
    CHANNEL_FILE_LIMIT,
    EXCERPT_LIMIT,
    FRAME_LIMIT,
    FRAMES_LIMIT,
    LINE_LIMIT,
    MODULE_LIMIT,
    RULES_VERSION,
    SOURCE_LIMIT,
    TITLE_LIMIT,
    TRUNCATED,
    fit,
    normalise_function,
    normalise_panic_message,
    normalise_title,
    strip_prefix,
)
from .neverguilty import NEVER_GUILTY, never_guilty
from .parse import parse_crash, rederive
from .shapes import SHAPES, TRIGGERS, Shape

__all__ = [
    "CHANNEL_FILE_LIMIT",
    "EXCERPT_LIMIT",
    "FRAME_LIMIT",
    "FRAMES_LIMIT",
    "LINE_LIMIT",
    "MODULE_LIMIT",
    "NEVER_GUILTY",
    "RULES_VERSION",
    "SHAPES",
    "SOURCE_LIMIT",
    "TITLE_LIMIT",
    "TRIGGERS",
    "TRUNCATED",
    "Shape",
    "fit",
    "never_guilty",
    "normalise_function",
    "normalise_panic_message",
    "normalise_title",
    "parse_crash",
    "rederive",
    "strip_prefix",
]
