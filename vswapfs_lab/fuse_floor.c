/* fuse_floor: the loop+FUSE round trip with no daemon work, for the benchmark.
 *
 * A minimal FUSE server in C on raw /dev/fuse (no libfuse): one regular
 * file "swap" of SIZE bytes whose 4 KiB pages live in malloc'd memory,
 * stored raw (no compression, no zero check), freed by
 * fallocate(PUNCH_HOLE).  It negotiates what vswapfs negotiates (ASYNC_READ,
 * BIG_WRITES, ASYNC_DIO, MAX_PAGES; max_write 1 MiB; max_background 64;
 * FOPEN_DIRECT_IO|FOPEN_PARALLEL_DIRECT_WRITES), so swap on it through
 * `losetup --direct-io=on` measures what any daemon pays for the kernel path
 * alone.  scripts/bench.py builds it with cc and runs it as the
 * "fuse-floor-c" backend; it is a yardstick, not part of vswapfs.
 *
 * With --uring it serves over FUSE-over-io_uring (Linux 6.14+, needs
 * /sys/module/fuse/parameters/enable_uring = Y): after INIT, every request
 * arrives as the completion of a FUSE_IO_URING_CMD_REGISTER or
 * COMMIT_AND_FETCH command on a ring queue per CPU, and one io_uring_enter
 * both answers a request and waits for the next.  That is the
 * "fuse-floor-c-uring" backend: what the kernel path costs over the other
 * transport this kernel offers (on the 2-CPU test machine: no less).
 *
 * With --lz4 it also does what vswapfs's first store does to a page, in C
 * and nothing more: a same-filled page is kept as its 8-byte value, any
 * other is compressed with lz4 (liblz4.so.1, the state cleared and
 * acceleration 1, as vswapfs's _lz4page.c does) and kept in a malloc'd
 * object of its size, or raw if it takes more than 3/4 of a page
 * (vswapfs's huge_threshold); a READ decompresses.  That is the
 * "fuse-floor-c-lz4" backend: what a daemon that stores pages as densely as
 * vswapfs's first store costs with no Python at all, on one thread (with no
 * CPU to spare, compressing on another does not help: docs/sustained.md),
 * so what lies between it and vswapfs is the daemon's own code.  It is a
 * yardstick for speed and for the memory at the peak, not for giving memory
 * back: glibc returns only the top of a heap of objects of every size, and
 * mlockall'd memory cannot be madvised away.
 *
 *     cc -O2 -pthread -o fuse_floor fuse_floor.c [-Wl,--no-as-needed -l:liblz4.so.1]  # that for --lz4
 *     fuse_floor [--uring] [--lz4] MOUNTPOINT SIZE_BYTES   # serves until unmounted
 *
 * The file system type is fuse.vswapfloor, so vswapfs tools never take it for theirs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096
#define MAX_WRITE (1 << 20)
#define ROOT_INO 1
#define SWAP_INO 2
#define NO_REPLY 1 /* handle(): FORGET and INTERRUPT get no answer */

/* FUSE-over-io_uring ABI (include/uapi/linux/fuse.h 7.42); the installed header may predate it */
#define FLOOR_OVER_IO_URING (1ULL << 41)
#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2
struct uring_ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct uring_req_header { char in_out[128]; char op_in[128]; struct uring_ent_in_out ent; };
struct uring_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };

/* lz4 (liblz4.so.1; Debian ships lz4.h only in liblz4-dev): declared as lz4.h declares them,
 * weak so that the floor without --lz4 links without it (hence --no-as-needed with it: the
 * linker keeps no library for weak references alone) */
typedef union LZ4_stream_u LZ4_stream_t;
extern LZ4_stream_t *LZ4_initStream(void *buffer, size_t size) __attribute__((weak));
extern int LZ4_compress_fast_continue(LZ4_stream_t *stream, const char *src, char *dst,
                                      int src_size, int dst_capacity, int acceleration) __attribute__((weak));
extern int LZ4_decompress_safe(const char *src, char *dst, int compressed_size, int dst_capacity)
    __attribute__((weak));
#define LZ4_STATE_BYTES 16416           /* LZ4_STREAMSIZE at lz4's default memory usage */
#define LZ4_BOUND (PAGE + PAGE / 255 + 16)
#define HUGE_THRESHOLD (PAGE * 3 / 4)   /* vswapfs's default: a page compressed past this is kept raw */
#define SAME ((unsigned char *)1)       /* pages[i] of a same-filled page (--lz4): its value in fill[i] */

static int fd;
static uint64_t size;
static unsigned char **pages; /* one pointer per 4 KiB page; NULL: a hole (zeros) */
static uint64_t stored;
static int lz4;          /* --lz4: pages are stored as vswapfs's first store keeps them */
static uint64_t *fill;   /* --lz4: the value of a same-filled page */
static uint16_t *length; /* --lz4: the bytes of a page's object (PAGE: raw) */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long served_dev, served_uring; /* requests answered over /dev/fuse and over the ring */

static void report(void) {
    fprintf(stderr, "fuse_floor: served %lu requests over /dev/fuse, %lu over io_uring\n", served_dev, served_uring);
}

/* --lz4: page i's object freed (it may be SAME or NULL). */
static void drop(uint64_t i) {
    if (pages[i] && pages[i] != SAME) free(pages[i]);
    if (pages[i]) stored--;
    pages[i] = NULL;
}

/* --lz4: store the page at src as slot i (what it held is dropped first); 0 or -ENOSPC. */
static int store_lz4(uint64_t i, const unsigned char *src) {
    static _Alignas(16) char state[LZ4_STATE_BYTES];
    static char block[LZ4_BOUND];
    uint64_t head, word;
    memcpy(&head, src, 8);
    int same = 1;
    for (int off = 8; off < PAGE && same; off += 8) {
        memcpy(&word, src + off, 8);
        same = word == head;
    }
    drop(i);
    if (same) {
        pages[i] = SAME;
        fill[i] = head;
        stored++;
        return 0;
    }
    int n = LZ4_compress_fast_continue(LZ4_initStream(state, sizeof state), (const char *)src, block, PAGE,
                                       sizeof block, 1);
    if (n <= 0 || n > HUGE_THRESHOLD) n = PAGE;  /* compresses poorly: kept raw */
    if (!(pages[i] = malloc(n))) return -ENOSPC;
    memcpy(pages[i], n == PAGE ? (const char *)src : block, n);
    length[i] = (uint16_t)n;
    stored++;
    return 0;
}

/* --lz4: page i into `to`; 0 or -EIO. */
static int load_lz4(uint64_t i, unsigned char *to) {
    unsigned char *p = pages[i];
    if (!p) { memset(to, 0, PAGE); return 0; }
    if (p == SAME) {
        for (int off = 0; off < PAGE; off += 8) memcpy(to + off, &fill[i], 8);
        return 0;
    }
    if (length[i] == PAGE) { memcpy(to, p, PAGE); return 0; }
    return LZ4_decompress_safe((const char *)p, (char *)to, length[i], PAGE) == PAGE ? 0 : -EIO;
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

/* Answer one request (not INIT): `op` is its opcode's struct, `data` what
 * follows it (a WRITE's bytes, a LOOKUP's name).  Writes the reply's
 * arguments to `out` (MAX_WRITE bytes of room); returns their size, -errno,
 * or NO_REPLY. */
static long handle(const struct fuse_in_header *h, const void *op, const unsigned char *data, void *out) {
    switch (h->opcode) {
    case FUSE_LOOKUP: {
        struct fuse_entry_out *e = out;
        if (h->nodeid != ROOT_INO || strcmp((const char *)data, "swap")) return -ENOENT;
        memset(e, 0, sizeof *e);
        e->nodeid = SWAP_INO;
        e->generation = 1;
        attr_of(SWAP_INO, &e->attr);
        return sizeof *e;
    }
    case FUSE_GETATTR: {
        struct fuse_attr_out *a = out;
        memset(a, 0, sizeof *a);
        attr_of(h->nodeid, &a->attr);
        return sizeof *a;
    }
    case FUSE_OPEN: case FUSE_OPENDIR: {
        struct fuse_open_out *o = out;
        memset(o, 0, sizeof *o);
        o->open_flags = h->nodeid == SWAP_INO ? FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES : 0;
        return sizeof *o;
    }
    case FUSE_READ: {
        const struct fuse_read_in *in = op;
        uint64_t end = in->offset + in->size;
        if (h->nodeid != SWAP_INO) return -EISDIR;
        if (end > size) end = size;
        if (in->offset % PAGE || end % PAGE || in->offset > end || end - in->offset > MAX_WRITE) return -EINVAL;
        for (uint64_t off = in->offset; off < end; off += PAGE) {
            unsigned char *p = pages[off / PAGE], *to = (unsigned char *)out + (off - in->offset);
            if (lz4) {
                if (load_lz4(off / PAGE, to)) return -EIO;
            } else if (p) memcpy(to, p, PAGE); else memset(to, 0, PAGE);
        }
        return (long)(end - in->offset);
    }
    case FUSE_WRITE: {
        const struct fuse_write_in *in = op;
        struct fuse_write_out *o = out;
        if (in->offset % PAGE || in->size % PAGE || in->offset + in->size > size) return -EINVAL;
        for (uint64_t i = 0; i < in->size / PAGE; i++) {
            if (lz4) {
                if (store_lz4(in->offset / PAGE + i, data + i * PAGE)) return -ENOSPC;
                continue;
            }
            unsigned char **slot = &pages[in->offset / PAGE + i];
            if (!*slot) {
                if (!(*slot = malloc(PAGE))) return -ENOSPC;
                stored++;
            }
            memcpy(*slot, data + i * PAGE, PAGE);
        }
        memset(o, 0, sizeof *o);
        o->size = in->size;
        return sizeof *o;
    }
    case FUSE_FALLOCATE: {
        const struct fuse_fallocate_in *in = op;
        if (in->mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) return -EOPNOTSUPP;
        uint64_t first = (in->offset + PAGE - 1) / PAGE, last = (in->offset + in->length) / PAGE;
        for (uint64_t i = first; i < last && i < size / PAGE; i++)
            if (lz4) drop(i);
            else if (pages[i]) { free(pages[i]); pages[i] = NULL; stored--; }
        return 0;
    }
    case FUSE_STATFS: {
        struct fuse_statfs_out *o = out;
        memset(o, 0, sizeof *o);
        o->st.blocks = size / PAGE;
        o->st.bfree = o->st.bavail = size / PAGE - stored;
        o->st.bsize = o->st.frsize = PAGE;
        o->st.namelen = 255;
        return sizeof *o;
    }
    case FUSE_FLUSH: case FUSE_RELEASE: case FUSE_RELEASEDIR: case FUSE_FSYNC: case FUSE_DESTROY:
        return 0;
    case FUSE_FORGET: case FUSE_BATCH_FORGET: case FUSE_INTERRUPT:
        return NO_REPLY;
    default:
        return -ENOSYS;
    }
}

static void reply(uint64_t unique, long res, const void *args) {
    struct fuse_out_header h = {.len = sizeof h + (res > 0 ? res : 0), .error = res < 0 ? res : 0, .unique = unique};
    struct iovec iov[2] = {{&h, sizeof h}, {(void *)args, res > 0 ? res : 0}};
    if (writev(fd, iov, 2) < 0 && errno != ENOENT) /* ENOENT: the request was interrupted */
        perror("fuse_floor: writev");
}

/* Read one request from /dev/fuse into buf; 0 when unmounted. */
static ssize_t read_request(unsigned char *buf, size_t room) {
    for (;;) {
        ssize_t n = read(fd, buf, room);
        if (n >= 0) return n;
        if (errno == ENODEV) return 0;
        if (errno != EINTR && errno != ENOENT && errno != EAGAIN) { perror("fuse_floor: read"); exit(1); }
    }
}

/* The /dev/fuse loop: every request (classic mode) or what the ring does not carry. */
static void *serve_dev(void *arg) {
    static unsigned char buf[MAX_WRITE + 4096], out[MAX_WRITE];
    (void)arg;
    for (;;) {
        ssize_t n = read_request(buf, sizeof buf);
        if (!n) exit(0); /* unmounted */
        const struct fuse_in_header *h = (void *)buf;
        const unsigned char *body = buf + sizeof *h;
        size_t op_size = h->opcode == FUSE_WRITE ? sizeof(struct fuse_write_in) : 0; /* a LOOKUP name starts the body */
        pthread_mutex_lock(&lock);
        long res = handle(h, body, body + op_size, out);
        served_dev++;
        pthread_mutex_unlock(&lock);
        if (res != NO_REPLY) reply(h->unique, res, out);
    }
    return NULL;
}

/* Answer INIT; with `uring`, ask for FUSE-over-io_uring (fails if the kernel does not offer it). */
static void handshake(int uring) {
    static unsigned char buf[MAX_WRITE + 4096];
    ssize_t n = read_request(buf, sizeof buf);
    const struct fuse_in_header *h = (void *)buf;
    const struct fuse_init_in *in = (void *)(buf + sizeof *h);
    if (n < (ssize_t)(sizeof *h + sizeof *in) || h->opcode != FUSE_INIT) { fprintf(stderr, "fuse_floor: no INIT\n"); exit(1); }
    uint64_t offered = in->flags | (in->flags & FUSE_INIT_EXT ? (uint64_t)in->flags2 << 32 : 0);
    uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES;
    if (uring) {
        if (!(offered & FLOOR_OVER_IO_URING)) {
            fprintf(stderr, "fuse_floor: the kernel offers no FUSE-over-io_uring (enable_uring?)\n");
            exit(1);
        }
        want |= FUSE_INIT_EXT | FLOOR_OVER_IO_URING;
    }
    want &= offered | FUSE_INIT_EXT;
    struct fuse_init_out out = {
        .major = FUSE_KERNEL_VERSION, .minor = in->minor < FUSE_KERNEL_MINOR_VERSION ? in->minor : FUSE_KERNEL_MINOR_VERSION,
        .max_readahead = in->max_readahead, .flags = (uint32_t)want, .flags2 = (uint32_t)(want >> 32),
        .max_background = 64, .congestion_threshold = 48, .max_write = MAX_WRITE,
        .time_gran = 1, .max_pages = MAX_WRITE / PAGE};
    reply(h->unique, sizeof out, &out);
}

/* -- io_uring, by hand (no liburing) --------------------------------------- */

#define ENTRIES_PER_QUEUE 4
struct ent { struct uring_req_header *hdr; unsigned char *payload; struct iovec iov[2]; uint16_t qid; };
static int ring;
static unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask, to_submit;
static unsigned char *sqes;
static struct io_uring_cqe *cqes;

static void ring_setup(unsigned entries) {
    struct io_uring_params p = {.flags = IORING_SETUP_SQE128};
    if ((ring = syscall(__NR_io_uring_setup, entries, &p)) < 0) { perror("fuse_floor: io_uring_setup"); exit(1); }
    unsigned char *sq = mmap(NULL, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    unsigned char *cq = mmap(NULL, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe), PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    sqes = mmap(NULL, p.sq_entries * 128, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { perror("fuse_floor: mmap ring"); exit(1); }
    sq_head = (void *)(sq + p.sq_off.head); sq_tail = (void *)(sq + p.sq_off.tail);
    sq_mask = (void *)(sq + p.sq_off.ring_mask); sq_array = (void *)(sq + p.sq_off.array);
    cq_head = (void *)(cq + p.cq_off.head); cq_tail = (void *)(cq + p.cq_off.tail);
    cq_mask = (void *)(cq + p.cq_off.ring_mask); cqes = (void *)(cq + p.cq_off.cqes);
}

/* Queue a FUSE uring command for entry e (REGISTER, or COMMIT_AND_FETCH of commit_id). */
static void ring_cmd(struct ent *e, unsigned cmd, uint64_t commit_id) {
    unsigned tail = *sq_tail, idx = tail & *sq_mask;
    struct io_uring_sqe *sqe = (void *)(sqes + idx * 128);
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd;
    sqe->user_data = (uint64_t)(uintptr_t)e;
    if (cmd == URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    }
    struct uring_cmd_req *req = (void *)sqe->cmd;
    req->qid = e->qid;
    req->commit_id = commit_id;
    sq_array[idx] = idx;
    __atomic_store_n(sq_tail, tail + 1, __ATOMIC_RELEASE);
    to_submit++;
}

static void serve_uring(void) {
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    unsigned n = (unsigned)ncpu * ENTRIES_PER_QUEUE, ring_entries = 1;
    while (ring_entries < 2 * n) ring_entries <<= 1;
    ring_setup(ring_entries);
    struct ent *ents = calloc(n, sizeof *ents);
    for (unsigned i = 0; i < n; i++) {
        struct ent *e = &ents[i];
        if (posix_memalign((void **)&e->hdr, PAGE, sizeof *e->hdr) || posix_memalign((void **)&e->payload, PAGE, MAX_WRITE)) {
            perror("fuse_floor: posix_memalign");
            exit(1);
        }
        memset(e->hdr, 0, sizeof *e->hdr);
        e->iov[0] = (struct iovec){e->hdr, sizeof *e->hdr};
        e->iov[1] = (struct iovec){e->payload, MAX_WRITE};
        e->qid = (uint16_t)(i / ENTRIES_PER_QUEUE);
        ring_cmd(e, URING_CMD_REGISTER, 0);
    }
    for (;;) {
        int r = syscall(__NR_io_uring_enter, ring, to_submit, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (r < 0 && errno != EINTR) { perror("fuse_floor: io_uring_enter"); exit(1); }
        if (r > 0) to_submit -= (unsigned)r < to_submit ? (unsigned)r : to_submit;
        unsigned head = *cq_head;
        while (head != __atomic_load_n(cq_tail, __ATOMIC_ACQUIRE)) {
            struct io_uring_cqe *c = &cqes[head & *cq_mask];
            struct ent *e = (void *)(uintptr_t)c->user_data;
            head++;
            if (c->res < 0) { /* the connection ended (unmount, abort) */
                if (c->res == -EINTR || c->res == -EAGAIN) { ring_cmd(e, URING_CMD_REGISTER, 0); continue; }
                exit(0);
            }
            const struct fuse_in_header *h = (void *)e->hdr->in_out;
            uint64_t commit = e->hdr->ent.commit_id;
            pthread_mutex_lock(&lock);
            long res = handle(h, e->hdr->op_in, e->payload, e->payload);
            served_uring++;
            pthread_mutex_unlock(&lock);
            struct fuse_out_header *oh = (void *)e->hdr->in_out;
            oh->len = sizeof *oh;
            oh->error = res < 0 ? (int32_t)res : 0;
            oh->unique = commit;
            e->hdr->ent.payload_sz = res > 0 ? (uint32_t)res : 0;
            ring_cmd(e, URING_CMD_COMMIT_AND_FETCH, commit);
        }
        __atomic_store_n(cq_head, head, __ATOMIC_RELEASE);
    }
}

int main(int argc, char **argv) {
    char opts[128];
    int uring = argc > 1 && !strcmp(argv[1], "--uring");
    lz4 = argc > 1 + uring && !strcmp(argv[1 + uring], "--lz4");
    int opts_n = uring + lz4;
    if (argc != 3 + opts_n || !(size = strtoull(argv[2 + opts_n], NULL, 0)) || size % PAGE) {
        fprintf(stderr, "usage: fuse_floor [--uring] [--lz4] MOUNTPOINT SIZE_BYTES (a multiple of 4096)\n");
        return 2;
    }
    if (!(pages = calloc(size / PAGE, sizeof *pages))) { perror("fuse_floor: calloc"); return 1; }
    if (lz4 && !LZ4_initStream) { fprintf(stderr, "fuse_floor: --lz4, but not linked with liblz4.so.1\n"); return 2; }
    if (lz4 && (!(fill = calloc(size / PAGE, sizeof *fill)) || !(length = calloc(size / PAGE, sizeof *length)))) {
        perror("fuse_floor: calloc");
        return 1;
    }
    if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)) perror("fuse_floor: mlockall"); /* as vswapfs does */
    if ((fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)) < 0) { perror("fuse_floor: /dev/fuse"); return 1; }
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd);
    if (mount("vswapfloor", argv[1 + opts_n], "fuse.vswapfloor", MS_NOSUID | MS_NODEV, opts)) {
        perror("fuse_floor: mount");
        return 1;
    }
    handshake(uring);
    atexit(report);
    if (!uring) {
        serve_dev(NULL);
        return 0;
    }
    pthread_t dev;
    pthread_create(&dev, NULL, serve_dev, NULL); /* what arrives before the ring is ready, and interrupts */
    serve_uring();
    return 0;
}
