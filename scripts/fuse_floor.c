/* fuse_floor: the loop+FUSE round trip with no daemon work, for the benchmark.
 *
 * A minimal single-threaded FUSE server in C on raw /dev/fuse (no libfuse):
 * one regular file "swap" of SIZE bytes whose 4 KiB pages live in malloc'd
 * memory, stored raw (no compression, no zero check), freed by
 * fallocate(PUNCH_HOLE).  It negotiates what vswapfs negotiates (ASYNC_READ,
 * BIG_WRITES, ASYNC_DIO, MAX_PAGES; max_write 1 MiB; max_background 64;
 * FOPEN_DIRECT_IO|FOPEN_PARALLEL_DIRECT_WRITES), so swap on it through
 * `losetup --direct-io=on` measures what any daemon pays for the kernel path
 * alone.  scripts/bench.py builds it with cc and runs it as the
 * "fuse-floor-c" backend; it is a yardstick, not part of vswapfs.
 *
 *     cc -O2 -o fuse_floor fuse_floor.c
 *     fuse_floor MOUNTPOINT SIZE_BYTES     # serves in the foreground until unmounted
 *
 * The file system type is fuse.vswapfloor, so vswapfs tools never take it for theirs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096
#define MAX_WRITE (1 << 20)
#define ROOT_INO 1
#define SWAP_INO 2

static int fd;
static uint64_t size;
static unsigned char **pages; /* one pointer per 4 KiB page; NULL: a hole (zeros) */
static unsigned char zeros[PAGE];
static unsigned char buf[MAX_WRITE + 4096];
static uint64_t stored;

static void reply(uint64_t unique, int error, const void *data, size_t len) {
    struct fuse_out_header h = {.len = sizeof h + (error ? 0 : len), .error = -error, .unique = unique};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)data, error ? 0 : len}};
    if (writev(fd, iov, 2) < 0 && errno != ENOENT) /* ENOENT: the request was interrupted */
        perror("fuse_floor: writev");
}

static void attr_of(uint64_t ino, struct fuse_attr *a) {
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->nlink = ino == ROOT_INO ? 2 : 1;
    a->mode = ino == ROOT_INO ? S_IFDIR | 0755 : S_IFREG | 0600;
    a->size = ino == ROOT_INO ? 0 : size;
    a->blocks = ino == ROOT_INO ? 0 : stored * (PAGE / 512);
    a->blksize = PAGE;
}

static void do_read(uint64_t unique, const struct fuse_read_in *in) {
    struct fuse_out_header h = {.unique = unique};
    struct iovec iov[1 + MAX_WRITE / PAGE];
    uint64_t off = in->offset, end = in->offset + in->size;
    int n = 1;
    if (end > size) end = size;
    if (off % PAGE || end % PAGE || off > end) { reply(unique, EINVAL, NULL, 0); return; }
    for (; off < end; off += PAGE, n++) {
        unsigned char *p = pages[off / PAGE];
        iov[n].iov_base = p ? p : zeros;
        iov[n].iov_len = PAGE;
    }
    h.len = sizeof h + (end - in->offset);
    iov[0].iov_base = &h;
    iov[0].iov_len = sizeof h;
    if (writev(fd, iov, n) < 0 && errno != ENOENT) perror("fuse_floor: writev");
}

static void do_write(uint64_t unique, const struct fuse_write_in *in, const unsigned char *data) {
    struct fuse_write_out out = {.size = in->size};
    if (in->offset % PAGE || in->size % PAGE || in->offset + in->size > size) {
        reply(unique, EINVAL, NULL, 0);
        return;
    }
    for (uint64_t i = 0; i < in->size / PAGE; i++) {
        unsigned char **slot = &pages[in->offset / PAGE + i];
        if (!*slot) {
            if (!(*slot = malloc(PAGE))) { reply(unique, ENOSPC, NULL, 0); return; }
            stored++;
        }
        memcpy(*slot, data + i * PAGE, PAGE);
    }
    reply(unique, 0, &out, sizeof out);
}

static void do_fallocate(uint64_t unique, const struct fuse_fallocate_in *in) {
    if (in->mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) { reply(unique, EOPNOTSUPP, NULL, 0); return; }
    uint64_t first = (in->offset + PAGE - 1) / PAGE, last = (in->offset + in->length) / PAGE;
    for (uint64_t i = first; i < last && i < size / PAGE; i++)
        if (pages[i]) { free(pages[i]); pages[i] = NULL; stored--; }
    reply(unique, 0, NULL, 0);
}

int main(int argc, char **argv) {
    char opts[128];
    if (argc != 3 || !(size = strtoull(argv[2], NULL, 0)) || size % PAGE) {
        fprintf(stderr, "usage: fuse_floor MOUNTPOINT SIZE_BYTES (a multiple of 4096)\n");
        return 2;
    }
    if (!(pages = calloc(size / PAGE, sizeof *pages))) { perror("fuse_floor: calloc"); return 1; }
    if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)) perror("fuse_floor: mlockall"); /* as vswapfs does */
    if ((fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)) < 0) { perror("fuse_floor: /dev/fuse"); return 1; }
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd);
    if (mount("vswapfloor", argv[1], "fuse.vswapfloor", MS_NOSUID | MS_NODEV, opts)) {
        perror("fuse_floor: mount");
        return 1;
    }
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN) continue;
            if (errno == ENODEV) return 0; /* unmounted */
            perror("fuse_floor: read");
            return 1;
        }
        struct fuse_in_header *h = (void *)buf;
        void *body = buf + sizeof *h;
        switch (h->opcode) {
        case FUSE_INIT: {
            struct fuse_init_in *in = body;
            struct fuse_init_out out = {
                .major = FUSE_KERNEL_VERSION, .minor = in->minor < FUSE_KERNEL_MINOR_VERSION ? in->minor : FUSE_KERNEL_MINOR_VERSION,
                .max_readahead = in->max_readahead,
                .flags = in->flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES),
                .max_background = 64, .congestion_threshold = 48, .max_write = MAX_WRITE,
                .time_gran = 1, .max_pages = MAX_WRITE / PAGE};
            reply(h->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_LOOKUP: {
            struct fuse_entry_out out = {0};
            if (h->nodeid != ROOT_INO || strcmp(body, "swap")) { reply(h->unique, ENOENT, NULL, 0); break; }
            out.nodeid = SWAP_INO;
            out.generation = 1;
            attr_of(SWAP_INO, &out.attr);
            reply(h->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_GETATTR: {
            struct fuse_attr_out out = {0};
            attr_of(h->nodeid, &out.attr);
            reply(h->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_OPEN: case FUSE_OPENDIR: {
            struct fuse_open_out out = {.open_flags = h->nodeid == SWAP_INO ? FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES : 0};
            reply(h->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_READ:
            if (h->nodeid != SWAP_INO) { reply(h->unique, EISDIR, NULL, 0); break; }
            do_read(h->unique, body);
            break;
        case FUSE_WRITE:
            do_write(h->unique, body, (unsigned char *)body + sizeof(struct fuse_write_in));
            break;
        case FUSE_FALLOCATE:
            do_fallocate(h->unique, body);
            break;
        case FUSE_STATFS: {
            struct fuse_statfs_out out = {.st = {.blocks = size / PAGE, .bfree = size / PAGE - stored,
                                                  .bavail = size / PAGE - stored, .bsize = PAGE,
                                                  .frsize = PAGE, .namelen = 255}};
            reply(h->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_FLUSH: case FUSE_RELEASE: case FUSE_RELEASEDIR: case FUSE_FSYNC:
            reply(h->unique, 0, NULL, 0);
            break;
        case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_INTERRUPT:
            break; /* no reply */
        case FUSE_DESTROY:
            reply(h->unique, 0, NULL, 0);
            return 0;
        default:
            reply(h->unique, ENOSYS, NULL, 0);
        }
    }
}
