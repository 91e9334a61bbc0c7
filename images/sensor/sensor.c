// SPDX-License-Identifier: GPL-2.0
/*
 * sensor.c - the "sensor driver" of the Quick Machine Recovery lab.
 *
 * A boot-start kernel module that, at init, reads every channel file
 * (C-*.sys) in a directory, in sorted name order, and parses it.  The parser
 * reproduces the shape of CrowdStrike's channel file 291 bug (July 2024): it
 * trusts the template's field count instead of the number of fields the
 * content actually supplies, reads past the end of its field table and
 * dereferences a wild pointer.  On a kernel booted with oops=panic the
 * machine panics; with panic=N it reboots, and crashes again on every boot
 * until the bad channel file is removed.
 *
 * Channel file format (all integers little-endian; see FORMAT.md):
 *
 *   offset  size  field
 *   0       4     magic "CHNL"
 *   4       2     u16 version               (1)
 *   6       2     u16 template_field_count  (fields the template names; 20)
 *   8       2     u16 content_field_count   (fields this file supplies; 20)
 *   10      2     u16 reserved              (0)
 *   12      4*n   u32 offsets[content_field_count]: byte offset, from the
 *                 start of the file, of each field's u32 value
 *   ...           field values (u32 each), anywhere in the file
 *
 * A valid file has template_field_count == content_field_count == 20.  The
 * "bad" file has template_field_count == 21 and content_field_count == 20.
 *
 * Parameters:
 *   channel_dir  directory to read (default /var/lib/sensor/channels)
 *   hang         if 1, init spins forever (boot-hang scenario)
 *   strict       if 1, a channel file whose template field count differs from its
 *                content field count is fatal: the driver calls panic() itself
 *                (the "driver panics on purpose" scenario) instead of reading past
 *                the field table.  Off by default: the GPF above is the lab's crash.
 *
 * Messages (relied on by the recovery agent and the tests):
 *   sensor: loading channel file <full path>
 *   sensor: channel file <full path> ok (<n> fields)
 *   sensor: loaded <N> channel files
 */
#define pr_fmt(fmt) fmt

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/init.h>
#include <linux/fs.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sort.h>
#include <linux/limits.h>
#include <linux/err.h>
#include <linux/processor.h>
#include <asm/unaligned.h>

/*
 * The version is set from the build: the lab builds 1.0 (the known-good driver) and a 2.0 with
 *   KCFLAGS='-DSENSOR_VERSION=\"2.0\" -DSENSOR_BAD_DRIVER'
 * a "bad driver" release that crashes at init whatever the channel files hold.
 */
#ifndef SENSOR_VERSION
#define SENSOR_VERSION		"1.0"
#endif
#define SENSOR_MAGIC		"CHNL"
#define SENSOR_HDR_SIZE		12
#define SENSOR_FIELD_SLOTS	32		/* size of the field table */
#define SENSOR_MAX_FILE_SIZE	(1 << 20)
#define SENSOR_MAX_FILES	256
/*
 * Stand-in for "whatever was in memory": the slots of the field table that
 * the content does not fill keep this value.  It is a non-canonical x86-64
 * address, so dereferencing it raises a general protection fault every time
 * (deterministic, unlike real uninitialised memory).
 */
#define SENSOR_POISON		0xdead000000000291ULL

static char *channel_dir = "/var/lib/sensor/channels";
module_param(channel_dir, charp, 0444);
MODULE_PARM_DESC(channel_dir, "Directory holding the C-*.sys channel files");

static bool hang;
module_param(hang, bool, 0444);
MODULE_PARM_DESC(hang, "Spin forever at init (boot-hang scenario)");

static bool strict;
module_param(strict, bool, 0444);
MODULE_PARM_DESC(strict, "panic() on a channel file whose template and content field counts differ");

static bool quiet;
module_param(quiet, bool, 0444);
MODULE_PARM_DESC(quiet, "Name no channel file in the log (silent-channel-file scenario)");

struct sensor_dir_ctx {
	struct dir_context ctx;
	char **names;
	unsigned int count;
};

static bool sensor_is_channel_name(const char *name, int len)
{
	return len > 6 && name[0] == 'C' && name[1] == '-' &&
	       memcmp(name + len - 4, ".sys", 4) == 0;
}

static bool sensor_filldir(struct dir_context *ctx, const char *name, int len,
			   loff_t pos, u64 ino, unsigned int d_type)
{
	struct sensor_dir_ctx *sctx = container_of(ctx, struct sensor_dir_ctx, ctx);
	char *copy;

	if (d_type != DT_REG && d_type != DT_UNKNOWN)
		return true;
	if (!sensor_is_channel_name(name, len))
		return true;
	if (sctx->count >= SENSOR_MAX_FILES)
		return false;
	copy = kstrndup(name, len, GFP_KERNEL);
	if (!copy)
		return false;
	sctx->names[sctx->count++] = copy;
	return true;
}

static int sensor_cmp_names(const void *a, const void *b)
{
	return strcmp(*(const char * const *)a, *(const char * const *)b);
}

static void *sensor_read_file(const char *path, size_t *size)
{
	struct file *f;
	loff_t fsize, pos = 0;
	ssize_t n;
	void *buf;

	f = filp_open(path, O_RDONLY, 0);
	if (IS_ERR(f))
		return ERR_CAST(f);
	fsize = i_size_read(file_inode(f));
	if (fsize <= 0 || fsize > SENSOR_MAX_FILE_SIZE) {
		filp_close(f, NULL);
		return ERR_PTR(-EFBIG);
	}
	buf = kvmalloc(fsize, GFP_KERNEL);
	if (!buf) {
		filp_close(f, NULL);
		return ERR_PTR(-ENOMEM);
	}
	n = kernel_read(f, buf, fsize, &pos);
	filp_close(f, NULL);
	if (n != fsize) {
		kvfree(buf);
		return ERR_PTR(n < 0 ? n : -EIO);
	}
	*size = fsize;
	return buf;
}

/*
 * Parse one channel file.  Deliberately buggy: see the comment on the
 * template loop.  noinline so that the oops names this function:
 *   RIP: 0010:sensor_parse_channel+0x.../0x... [sensor]
 */
static noinline int sensor_parse_channel(const char *path, const u8 *data,
					 size_t size)
{
	const u32 **fields;
	u16 version, template_count, content_count;
	u32 checksum = 0;
	unsigned int i;

	if (size < SENSOR_HDR_SIZE || memcmp(data, SENSOR_MAGIC, 4) != 0) {
		pr_err("sensor: channel file %s: bad magic\n", path);
		return -EINVAL;
	}
	version = get_unaligned_le16(data + 4);
	template_count = get_unaligned_le16(data + 6);
	content_count = get_unaligned_le16(data + 8);

	if (content_count > SENSOR_FIELD_SLOTS ||
	    SENSOR_HDR_SIZE + 4 * (size_t)content_count > size) {
		pr_err("sensor: channel file %s: bad content field count %u\n",
		       path, content_count);
		return -EINVAL;
	}

	/*
	 * strict=1: a driver that treats a corrupt channel file as fatal and panics on
	 * purpose.  The panic's call trace names this function below panic().
	 */
	if (strict && template_count != content_count)
		panic("sensor: channel file %s is corrupt: template has %u fields, content %u\n",
		      path, template_count, content_count);

	/* The field table: one pointer per field into the file's data. */
	fields = kmalloc_array(SENSOR_FIELD_SLOTS, sizeof(*fields), GFP_KERNEL);
	if (!fields)
		return -ENOMEM;
	/* Slots the content does not fill hold "garbage" (see SENSOR_POISON). */
	for (i = 0; i < SENSOR_FIELD_SLOTS; i++)
		fields[i] = (const u32 *)(uintptr_t)(SENSOR_POISON + 8 * i);

	for (i = 0; i < content_count; i++) {
		u32 off = get_unaligned_le32(data + SENSOR_HDR_SIZE + 4 * i);

		if (off > size - 4) {
			pr_err("sensor: channel file %s: field %u offset %u out of range\n",
			       path, i, off);
			kfree(fields);
			return -EINVAL;
		}
		fields[i] = (const u32 *)(data + off);
	}

	/*
	 * THE BUG: the loop is bounded by the template's field count, which
	 * is never checked against content_count.  With a 21-field template
	 * and 20 content fields, fields[20] is read past the filled part of
	 * the table and dereferenced: general protection fault.
	 */
	for (i = 0; i < template_count; i++)
		checksum += READ_ONCE(*fields[i]);

	kfree(fields);
	if (!quiet)
		pr_info("sensor: channel file %s ok (%u fields)\n", path, template_count);
	pr_debug("sensor: channel file %s version %u checksum %08x\n",
		 path, version, checksum);
	return 0;
}

#ifdef SENSOR_BAD_DRIVER
/*
 * The bad-driver scenario: version 2.0 looks its lookup tables up through a
 * pointer that nothing ever sets, so init dereferences NULL (+ an offset):
 *   BUG: kernel NULL pointer dereference, address: 0000000000000018
 *   RIP: 0010:sensor_v2_init_tables+0x.../0x... [sensor]
 * The fix is not a content file but rolling the driver back to 1.0 from the
 * driver store.
 */
struct sensor_v2_tables {
	u64 magic;
	u64 count;
	u64 reserved;
	u64 slots[8];
};

static struct sensor_v2_tables *sensor_v2_tables;	/* never set: the bug */

static noinline int sensor_v2_init_tables(void)
{
	u64 slots = READ_ONCE(sensor_v2_tables->slots[0]);

	pr_info("sensor: v2 tables ready (%llu slots)\n", slots);
	return 0;
}
#endif

static int __init sensor_init(void)
{
	struct sensor_dir_ctx sctx = { .ctx.actor = sensor_filldir };
	struct file *dir;
	unsigned int i, loaded = 0;
	char *path;
	int err;

	pr_info("sensor: version %s, channel_dir %s\n", SENSOR_VERSION, channel_dir);
#ifdef SENSOR_BAD_DRIVER
	err = sensor_v2_init_tables();
	if (err)
		return err;
#endif

	if (hang) {
		pr_info("sensor: hang=1, spinning forever\n");
		for (;;)
			cpu_relax();
	}

	path = kmalloc(PATH_MAX, GFP_KERNEL);
	sctx.names = kcalloc(SENSOR_MAX_FILES, sizeof(char *), GFP_KERNEL);
	if (!path || !sctx.names) {
		err = -ENOMEM;
		goto out;
	}

	dir = filp_open(channel_dir, O_RDONLY | O_DIRECTORY, 0);
	if (IS_ERR(dir)) {
		pr_warn("sensor: cannot open %s: %ld\n", channel_dir, PTR_ERR(dir));
		err = 0;	/* no channel files: nothing to do */
		goto done;
	}
	err = iterate_dir(dir, &sctx.ctx);
	filp_close(dir, NULL);
	if (err) {
		pr_err("sensor: cannot list %s: %d\n", channel_dir, err);
		goto out;
	}

	sort(sctx.names, sctx.count, sizeof(char *), sensor_cmp_names, NULL);

	for (i = 0; i < sctx.count; i++) {
		size_t size = 0;
		void *data;

		snprintf(path, PATH_MAX, "%s/%s", channel_dir, sctx.names[i]);
		if (!quiet)
			pr_info("sensor: loading channel file %s\n", path);
		data = sensor_read_file(path, &size);
		if (IS_ERR(data)) {
			pr_err("sensor: cannot read %s: %ld\n", path, PTR_ERR(data));
			continue;
		}
		if (sensor_parse_channel(path, data, size) == 0)
			loaded++;
		kvfree(data);
	}
done:
	pr_info("sensor: loaded %u channel files\n", loaded);
	err = 0;
out:
	if (sctx.names)
		for (i = 0; i < sctx.count; i++)
			kfree(sctx.names[i]);
	kfree(sctx.names);
	kfree(path);
	return err;
}

static void __exit sensor_exit(void)
{
	pr_info("sensor: unloaded\n");
}

module_init(sensor_init);
module_exit(sensor_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("Quick Machine Recovery lab");
MODULE_DESCRIPTION("Sensor driver that parses channel files (crashes on a CrowdStrike-shaped bad one)");
MODULE_VERSION(SENSOR_VERSION);
