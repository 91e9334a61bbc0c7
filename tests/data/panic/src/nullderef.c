// SPDX-License-Identifier: GPL-2.0
/*
 * nullderef.c - a second, differently shaped crash for parser tests:
 * a NULL pointer dereference (page fault, not a GPF) in a function with a
 * different name, in a module with a different name.
 */
#include <linux/module.h>
#include <linux/init.h>
#include <linux/kernel.h>

struct widget_config {
	const char *name;
	unsigned int rate;
};

struct widget {
	struct widget_config *config;
};

static struct widget the_widget;	/* config never set: NULL */

static noinline unsigned int widget_read_rate(struct widget *w)
{
	return READ_ONCE(w->config->rate);	/* NULL + 8 */
}

static int __init widget_init(void)
{
	pr_info("widget: probing\n");
	pr_info("widget: rate %u\n", widget_read_rate(&the_widget));
	return 0;
}

static void __exit widget_exit(void)
{
}

module_init(widget_init);
module_exit(widget_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Crashes with a NULL dereference at load (test data generator)");
MODULE_VERSION("1.0");
