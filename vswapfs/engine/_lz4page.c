/* _lz4page: lz4 for pages, the way the codec needs it.
 *
 * compress() and decompress() take one page; encode_pages() takes a write's
 * pages together and does all the first store asks of each (same-filled?
 * else lz4, poor or not) in one call, with nothing made per page but what
 * is kept: the int of a same-filled page or the block of a compressed one.
 * gather() makes a READ's reply: the pages one after the other in one bytes
 * object, lz4 blocks decoded straight into their places.
 *
 * python-lz4's lz4.block is what the codec falls back to without this
 * module (a build with no C compiler or no liblz4.so.1).  For each page
 * it compresses into a scratch buffer it mallocs, copies the result into
 * a new bytes object and frees the scratch; the codec then copied that
 * once more to put LZ4_MARK in front, and a READ's decompress went through
 * a malloc, a copy and a free too (and keyword parsing and a memoryview
 * to skip the mark).  Here the lz4 state and the scratch are on the
 * stack, the mark is written in place, the one bytes object returned is
 * the only allocation, and a block decodes straight into the page
 * returned.  Nothing else is allocated: an allocation on a serving thread
 * can wait on the very reclaim that thread serves.  The compression is python-lz4's exactly (the state
 * cleared, then LZ4_compress_fast_continue with no dictionary: an
 * independent block, byte for byte what lz4.block.compress(page,
 * store_size=False) makes, which the tests check), and the GIL is released
 * while lz4 runs, as python-lz4 does.
 *
 * lz4's header is not needed (Debian ships it only in liblz4-dev): the few
 * functions used are declared below as lz4.h has declared them since
 * 1.9.0, and the module links against liblz4.so.1, which every systemd
 * system has.  (lz4's own faster resets were measured and lost: keeping
 * the hash table between pages made a file page 2x slower to compress,
 * and LZ4_compress_fast_extState's 16-bit table for small inputs a quarter
 * slower; docs/sustained.md.)
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef union LZ4_stream_u LZ4_stream_t; /* opaque: liblz4 sets it up in our buffer */

extern LZ4_stream_t *LZ4_initStream(void *buffer, size_t size);
extern int LZ4_sizeofState(void);
extern int LZ4_compress_fast_continue(LZ4_stream_t *stream, const char *src, char *dst,
                                      int src_size, int dst_capacity, int acceleration);
extern int LZ4_decompress_safe(const char *src, char *dst, int compressed_size, int dst_capacity);
extern int LZ4_versionNumber(void);

#define MAX_BYTES 4096                   /* the most compress takes: a page */
#define BOUND(n) ((n) + (n) / 255 + 16)  /* LZ4_COMPRESSBOUND: the most n bytes become */
#define STATE_BYTES 16416                /* LZ4_STREAMSIZE at lz4's default memory usage */

/* 0 if a call passed `want` arguments, else -1 with a TypeError that shows `call`. */
static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *call) {
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, not %zd", call, want, nargs);
    return -1;
}

/* args[0] as a buffer (the caller releases it) and args[1] as a truth value:
 * 0, or -1 with an exception set and no buffer held. */
static int buffer_and_mark(PyObject *const *args, Py_buffer *in, int *mark) {
    *mark = PyObject_IsTrue(args[1]);
    if (*mark < 0)
        return -1;
    return PyObject_GetBuffer(args[0], in, PyBUF_SIMPLE);
}

/* n bytes at src as an lz4 block in dst (room for BOUND(n)), the state cleared
 * first as python-lz4 does: the block's size, or -1 if liblz4 would not set the
 * state up (too small or misaligned).  No Python: called with the GIL released. */
static int compress_block(char *state, const char *src, int n, char *dst) {
    LZ4_stream_t *stream = LZ4_initStream(state, STATE_BYTES);
    return stream == NULL ? -1 : LZ4_compress_fast_continue(stream, src, dst, n, BOUND(n), 1);
}

PyDoc_STRVAR(compress_doc,
"compress(page, mark, /) -> bytes\n\n"
"``page`` (a contiguous buffer of at most a page) as an lz4 block, with one\n"
"0 byte in front of it when ``mark`` is true.");

static PyObject *compress(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    int mark;
    Py_buffer in;
    if (check_nargs(nargs, 2, "compress(page, mark)") < 0 || buffer_and_mark(args, &in, &mark) < 0)
        return NULL;
    if (in.len > MAX_BYTES) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "compress takes at most %d bytes, not %zd", MAX_BYTES, in.len);
        return NULL;
    }
    /* On the stack, as python-lz4 keeps its state: a serving thread's stack is
     * locked, and a heap allocation here could wait on the reclaim this very
     * thread serves (the daemon in its hog's cgroup, tests/test_daemon.py). */
    _Alignas(16) char state[STATE_BYTES];
    char out[1 + BOUND(MAX_BYTES)];
    int n = (int)in.len, size;
    Py_BEGIN_ALLOW_THREADS
    size = compress_block(state, in.buf, n, out + 1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    if (size <= 0 && n > 0) { /* cannot happen with a bound-sized output and a state set up */
        PyErr_SetString(PyExc_RuntimeError, "lz4 failed to compress");
        return NULL;
    }
    out[0] = 0;
    return PyBytes_FromStringAndSize(out + 1 - mark, (Py_ssize_t)size + mark);
}

PyDoc_STRVAR(decompress_doc,
"decompress(blob, skip, size, /) -> bytes\n\n"
"The ``size`` bytes the lz4 block in ``blob`` after its first ``skip`` bytes\n"
"holds.  ValueError if it is not a block of exactly ``size`` bytes.");

static PyObject *decompress(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 3, "decompress(blob, skip, size)") < 0)
        return NULL;
    Py_ssize_t skip = PyLong_AsSsize_t(args[1]);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0 || size > MAX_BYTES) {
        PyErr_Format(PyExc_ValueError, "size must be in 0..%d, not %zd", MAX_BYTES, size);
        return NULL;
    }
    Py_buffer in;
    if (PyObject_GetBuffer(args[0], &in, PyBUF_SIMPLE) < 0)
        return NULL;
    if (skip < 0 || skip > in.len || in.len - skip > INT_MAX) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "skip %zd is outside the %zd-byte blob", skip, in.len);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    int got;
    Py_BEGIN_ALLOW_THREADS
    got = LZ4_decompress_safe((const char *)in.buf + skip, PyBytes_AS_STRING(out),
                              (int)(in.len - skip), (int)size);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    if (got != size) {
        Py_DECREF(out);
        if (got < 0)
            PyErr_SetString(PyExc_ValueError, "not an lz4 block, or it decodes to more than size bytes");
        else
            PyErr_Format(PyExc_ValueError, "the lz4 block decodes to %d bytes, not %zd", got, size);
        return NULL;
    }
    return out;
}

PyDoc_STRVAR(encode_pages_doc,
"encode_pages(data, mark, limit, /) -> list\n\n"
"Each page of ``data`` (a whole number of pages) as the codec stores it\n"
"first: the 64-bit value (an int, little-endian) a same-filled page repeats;\n"
"else its lz4 block, after a 0 byte if ``mark``, if that takes at most\n"
"``limit`` bytes; else None (it compresses poorly).  A write's pages in one\n"
"call: no bytes object per page to compare, slice and compress.");

static PyObject *encode_pages(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 3, "encode_pages(data, mark, limit)") < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[2]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    int mark;
    Py_buffer in;
    if (buffer_and_mark(args, &in, &mark) < 0)
        return NULL;
    if (in.len % MAX_BYTES) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "encode_pages takes whole %d-byte pages, not %zd bytes",
                     MAX_BYTES, in.len);
        return NULL;
    }
    Py_ssize_t count = in.len / MAX_BYTES;
    PyObject *list = PyList_New(count);
    if (list == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    _Alignas(16) char state[STATE_BYTES]; /* on the stack, as in compress() */
    char out[1 + BOUND(MAX_BYTES)];
    out[0] = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *page = (const char *)in.buf + i * MAX_BYTES;
        PyObject *item;
        if (memcmp(page, page + 8, MAX_BYTES - 8) == 0) { /* one 8-byte value, repeated */
            uint64_t value = 0;
            for (int b = 7; b >= 0; b--) /* little-endian, as int.from_bytes(head, "little") */
                value = (value << 8) | (unsigned char)page[b];
            item = PyLong_FromUnsignedLongLong(value);
        } else {
            int size;
            Py_BEGIN_ALLOW_THREADS
            size = compress_block(state, page, MAX_BYTES, out + 1);
            Py_END_ALLOW_THREADS
            if (size <= 0) {
                PyErr_SetString(PyExc_RuntimeError, "lz4 failed to compress");
                item = NULL;
            } else if ((Py_ssize_t)size + mark > limit) {
                item = Py_NewRef(Py_None);
            } else {
                item = PyBytes_FromStringAndSize(out + 1 - mark, (Py_ssize_t)size + mark);
            }
        }
        if (item == NULL) {
            PyBuffer_Release(&in);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    PyBuffer_Release(&in);
    return list;
}

#define MAX_PARTS 256 /* the most gather takes: a 1 MiB READ (max_read) */

PyDoc_STRVAR(gather_doc,
"gather(parts, skip, /) -> bytes\n\n"
"The pages ``parts`` (a list of at most 256 bytes objects) stand for, one\n"
"after the other: a part of exactly a page is that page, any other is an\n"
"lz4 block after ``skip`` bytes, decoded straight into its place.\n"
"ValueError if one does not decode to exactly a page.  A READ's reply in\n"
"one allocation: no page object per page, no join.");

static PyObject *gather(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "gather(parts, skip)") < 0)
        return NULL;
    PyObject *parts = args[0];
    if (!PyList_CheckExact(parts)) {
        PyErr_SetString(PyExc_TypeError, "gather takes a list of bytes");
        return NULL;
    }
    Py_ssize_t skip = PyLong_AsSsize_t(args[1]);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(parts);
    if (count > MAX_PARTS || skip < 0) {
        PyErr_Format(PyExc_ValueError, "gather takes at most %d parts and a skip >= 0, not %zd and %zd",
                     MAX_PARTS, count, skip);
        return NULL;
    }
    const char *src[MAX_PARTS];
    Py_ssize_t len[MAX_PARTS];
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *part = PyList_GET_ITEM(parts, i);
        if (!PyBytes_CheckExact(part)) {
            PyErr_Format(PyExc_TypeError, "part %zd is not bytes", i);
            return NULL;
        }
        src[i] = PyBytes_AS_STRING(part);
        len[i] = PyBytes_GET_SIZE(part);
        if (len[i] != MAX_BYTES && (len[i] <= skip || len[i] - skip > INT_MAX)) {
            PyErr_Format(PyExc_ValueError, "part %zd (%zd bytes) is no lz4 block after %zd bytes", i, len[i], skip);
            return NULL;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * MAX_BYTES);
    if (out == NULL)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    Py_ssize_t bad = -1;
    int got = 0;
    /* The parts are bytes (immutable) the list holds, and the list is the
     * caller's own: nothing they point to changes while the GIL is released. */
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++, dst += MAX_BYTES) {
        if (len[i] == MAX_BYTES) {
            memcpy(dst, src[i], MAX_BYTES);
            continue;
        }
        got = LZ4_decompress_safe(src[i] + skip, dst, (int)(len[i] - skip), MAX_BYTES);
        if (got != MAX_BYTES) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        Py_DECREF(out);
        if (got < 0)
            PyErr_Format(PyExc_ValueError, "part %zd is not an lz4 block of a page", bad);
        else
            PyErr_Format(PyExc_ValueError, "part %zd decodes to %d bytes, not a page", bad, got);
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL, gather_doc},
    {"compress", (PyCFunction)(void (*)(void))compress, METH_FASTCALL, compress_doc},
    {"encode_pages", (PyCFunction)(void (*)(void))encode_pages, METH_FASTCALL, encode_pages_doc},
    {"decompress", (PyCFunction)(void (*)(void))decompress, METH_FASTCALL, decompress_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "vswapfs.engine._lz4page",
    "lz4 for pages: python-lz4's block format without its copies (see the C source).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lz4page(void) {
    if (LZ4_versionNumber() < 10900) { /* the prototypes above are 1.9's */
        PyErr_Format(PyExc_ImportError, "liblz4 %d is older than 1.9.0", LZ4_versionNumber());
        return NULL;
    }
    if (LZ4_sizeofState() > STATE_BYTES) { /* a liblz4 built with a larger hash table */
        PyErr_Format(PyExc_ImportError, "liblz4's state takes %d bytes, more than %d",
                     LZ4_sizeofState(), STATE_BYTES);
        return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m != NULL && (PyModule_AddIntConstant(m, "LIBRARY_VERSION", LZ4_versionNumber()) < 0 ||
                      PyModule_AddIntConstant(m, "MAX_PARTS", MAX_PARTS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
