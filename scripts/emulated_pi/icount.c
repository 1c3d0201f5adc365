/*
 * icount: a QEMU TCG plugin that counts the guest instructions executed inside one address
 * range (the code segment of a kernel library), driven by the guest itself.
 *
 *   qemu-aarch64 -plugin libicount.so,out=/tmp/counts.txt prog ...
 *
 * Every translated block gets a record {first insn address, insn count, executions}; an
 * inline add (no helper call) bumps its execution counter each time it runs. The guest talks
 * to the plugin through a system call number no kernel defines (QEMU answers -ENOSYS, the
 * plugin sees it first):
 *
 *   syscall(ICOUNT_SYSCALL, 1)               zero every execution counter
 *   syscall(ICOUNT_SYSCALL, 2, lo, hi, tag)  append "tag count" to the out file, where count
 *                                            is the number of executed instructions whose
 *                                            address is in [lo, hi) since the last reset
 *
 * With profile=PATH as well, each report also appends "tag offset n_insns executions" (offset
 * from lo in hex) per executed block in range: where in the disassembly the count comes from.
 *
 * Counts are exact and repeatable for single-threaded guests (the counters are plain adds:
 * run the measured code on one thread). aarch64 instructions are 4 bytes and a block's
 * instructions are contiguous, so the in-range part of a block follows from its first
 * address.
 *
 * Debian ships no qemu-plugin.h, so the few declarations used here are written out below,
 * following QEMU's documented plugin API, version 1 (QEMU 7.x).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- QEMU plugin API declarations (API version 1) ---- */
typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t; /* opaque here: never read */
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 = 0 };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num,
                                              uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                                              uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

/* ---- the plugin ---- */
#define ICOUNT_SYSCALL 0x5BA4
#define INSN_BYTES 4
#define CHUNK 4096

struct block {
    uint64_t vaddr;   /* address of the first instruction */
    uint64_t n_insns;
    uint64_t execs;   /* bumped inline on every execution */
};

struct chunk {
    struct block blocks[CHUNK];
    size_t used;
    struct chunk *next;
};

static struct chunk *chunks;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *out;
static FILE *profile; /* optional: per-block executions of each report, for disassembly */

static struct block *new_block(void)
{
    /* Chunks are never freed or moved: the translated code holds pointers into them. */
    if (!chunks || chunks->used == CHUNK) {
        struct chunk *c = calloc(1, sizeof(*c));
        if (!c) {
            fprintf(stderr, "icount: out of memory\n");
            abort();
        }
        c->next = chunks;
        chunks = c;
    }
    return &chunks->blocks[chunks->used++];
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    pthread_mutex_lock(&lock);
    struct block *b = new_block();
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = qemu_plugin_tb_n_insns(tb);
    pthread_mutex_unlock(&lock);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->execs, 1);
}

static uint64_t insns_in(const struct block *b, uint64_t lo, uint64_t hi)
{
    uint64_t start = b->vaddr, end = b->vaddr + b->n_insns * INSN_BYTES;
    if (start < lo) start = lo;
    if (end > hi) end = hi;
    return end > start ? (end - start) / INSN_BYTES : 0;
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != ICOUNT_SYSCALL) return;
    pthread_mutex_lock(&lock);
    if (a1 == 1) {
        for (struct chunk *c = chunks; c; c = c->next)
            for (size_t i = 0; i < c->used; i++) c->blocks[i].execs = 0;
    } else if (a1 == 2) {
        uint64_t total = 0;
        for (struct chunk *c = chunks; c; c = c->next)
            for (size_t i = 0; i < c->used; i++)
                if (c->blocks[i].execs) {
                    uint64_t n = insns_in(&c->blocks[i], a2, a3);
                    total += c->blocks[i].execs * n;
                    if (profile && n) {
                        uint64_t first = c->blocks[i].vaddr > a2 ? c->blocks[i].vaddr : a2;
                        fprintf(profile, "%" PRIu64 " %" PRIx64 " %" PRIu64 " %" PRIu64 "\n", a4, first - a2, n,
                                c->blocks[i].execs);
                    }
                }
        fprintf(out, "%" PRIu64 " %" PRIu64 "\n", a4, total);
        if (profile) fflush(profile);
        fflush(out);
    }
    pthread_mutex_unlock(&lock);
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    if (out && out != stderr) fclose(out);
    if (profile) fclose(profile);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    out = stderr;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = fopen(argv[i] + 4, "a");
            if (!out) {
                fprintf(stderr, "icount: cannot open %s\n", argv[i] + 4);
                return -1;
            }
        } else if (strncmp(argv[i], "profile=", 8) == 0) {
            profile = fopen(argv[i] + 8, "a");
            if (!profile) {
                fprintf(stderr, "icount: cannot open %s\n", argv[i] + 8);
                return -1;
            }
        } else {
            fprintf(stderr, "icount: unknown argument %s (expected out=PATH or profile=PATH)\n", argv[i]);
            return -1;
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
