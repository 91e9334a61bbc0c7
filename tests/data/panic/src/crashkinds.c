// SPDX-License-Identifier: GPL-2.0
/*
 * crashkinds.c - the other report kinds Debian's kernel prints, for parser tests.
 *
 * A "gadget" driver whose init goes wrong in the way the kind parameter selects,
 * each in a function of its own (noinline) so that the report names it:
 *
 *   kind=warn     WARN_ON() in gadget_check_state(): "WARNING: CPU: N PID: N at
 *                 crashkinds.c:L gadget_check_state+..." and a call trace; init goes on
 *                 and the module loads (no panic without panic_on_warn)
 *   kind=bug      BUG_ON() in gadget_claim_slot(): "kernel BUG at crashkinds.c:L!",
 *                 "invalid opcode", an oops (a panic with oops=panic)
 *   kind=hung     gadget_wait_reset() waits uninterruptibly (state D) for a completion
 *                 nothing signals: "INFO: task insmod:N blocked for more than N seconds."
 *                 once kernel.hung_task_timeout_secs has passed
 *   kind=divide   gadget_scale_rate() divides by a divisor that is zero: "divide error",
 *                 an oops (a panic with oops=panic)
 *
 * Build with -fmacro-prefix-map=$(src)/= (see capture.sh) so that __FILE__, and thus the
 * WARNING and BUG lines, read "crashkinds.c" as an in-tree driver's "drivers/x/y.c" would,
 * not the build directory.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/bug.h>
#include <linux/completion.h>
#include <linux/string.h>

static char *kind = "warn";
module_param(kind, charp, 0444);
MODULE_PARM_DESC(kind, "How init goes wrong: warn, bug, hung or divide");

enum gadget_state { GADGET_OFF, GADGET_READY };

struct gadget {
	enum gadget_state state;
	unsigned long slots;		/* bitmap of claimed slots */
	unsigned int rate;
	unsigned int divisor;		/* never set: 0 */
	struct completion reset_done;	/* never completed */
};

static struct gadget the_gadget = { .state = GADGET_OFF, .slots = 1, .rate = 48000 };

static noinline void gadget_check_state(struct gadget *g)
{
	WARN_ON(READ_ONCE(g->state) != GADGET_READY);
}

static noinline void gadget_claim_slot(struct gadget *g, unsigned int slot)
{
	BUG_ON(test_and_set_bit(slot, &g->slots));	/* slot 0 is taken already */
}

static noinline void gadget_wait_reset(struct gadget *g)
{
	pr_info("gadget: waiting for the reset to finish\n");
	wait_for_completion(&g->reset_done);
}

static noinline unsigned int gadget_scale_rate(struct gadget *g)
{
	return READ_ONCE(g->rate) / READ_ONCE(g->divisor);
}

static int __init gadget_init(void)
{
	struct gadget *g = &the_gadget;

	pr_info("gadget: probing, kind=%s\n", kind);
	init_completion(&g->reset_done);
	if (strcmp(kind, "warn") == 0)
		gadget_check_state(g);
	else if (strcmp(kind, "bug") == 0)
		gadget_claim_slot(g, 0);
	else if (strcmp(kind, "hung") == 0)
		gadget_wait_reset(g);
	else if (strcmp(kind, "divide") == 0)
		pr_info("gadget: rate %u\n", gadget_scale_rate(g));
	else
		return -EINVAL;
	pr_info("gadget: probed\n");
	return 0;
}

static void __exit gadget_exit(void)
{
}

module_init(gadget_init);
module_exit(gadget_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Goes wrong at load in the way kind= selects (test data generator)");
MODULE_VERSION("1.0");
