"""The table of frames that are never the culprit, one row per group with its reason."""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def any_of(patterns: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_NEVER_GUILTY_RE = any_of([p for _group, _why, patterns in NEVER_GUILTY for p in patterns])


def never_guilty(function: str) -> bool:
    """Whether ``function`` (a normalised name) is in the ``NEVER_GUILTY`` table."""
    return _NEVER_GUILTY_RE.search(function) is not None
