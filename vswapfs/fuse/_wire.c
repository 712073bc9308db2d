/* _wire: a channel thread's READ and WRITE, parsed, answered and counted in C.
 *
 * Nearly every request swap sends is a READ or WRITE of a page or two, and
 * what the daemon spends on a request beyond compression is what its time
 * per page is made of (docs/sustained.md).  Session._serve_data does this
 * request's work in Python: the header and the body unpacked into a tuple
 * of thirteen ints, a Context made, the file system's *_blocking method
 * called, the reply's header packed, os.writev given a list, three tally
 * items rebuilt.  serve_data() below does the same with the header read in
 * place: what it makes for Python is the method's arguments and nothing
 * else, and the reply is one writev(2) with the GIL released.  The file
 * system's method is called exactly as Session._serve_data calls it, and a
 * failure is answered by Session._fail (handed in), so the two paths give
 * the same replies, which a test holds them to.  Where this module does not
 * build, Session._serve_data is the path.
 *
 * read_request() reads the next request for a channel thread: where /dev/fuse
 * has none (a non-blocking fd, between requests), os.readv raises
 * BlockingIOError, and making that exception (its message decoded from the
 * locale, a traceback entry in the compiled caller) was 7% of the serving
 * thread's time on a swap-in-heavy load (docs/sustained.md); here it is a
 * return value.
 *
 * Nothing here knows swap: it serves whatever file system the session has.
 * The layouts are fuse.h's (struct fuse_in_header, fuse_read_in,
 * fuse_write_in, fuse_out_header, fuse_write_out), little-endian as the
 * kernel writes them on the machines this runs on (x86_64, arm64).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define OP_READ 15
#define OP_WRITE 16
#define IN_HEADER_BYTES 40  /* struct fuse_in_header */
#define DATA_IN_BYTES 64    /* the header and what fuse_read_in and fuse_write_in share */
#define WRITE_DATA_AT 80    /* the header and the 40 bytes of fuse_write_in: a WRITE's data */
#define OUT_HEADER_BYTES 16 /* struct fuse_out_header */

/* The codes serve_data returns (Session._serve_here acts on them). */
#define NOT_MINE 0          /* not a READ or WRITE that checks: the general path serves it */
#define SERVED 1            /* answered (or failed and answered by fail) and counted */
#define DEFERRED 2          /* the method returned DEFER: nothing answered, hand it over */
#define REPLY_FAILED 1000   /* answered, but writev failed with errno (added): log it */

struct in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

struct data_in { /* fuse_read_in and fuse_write_in begin alike */
    uint64_t fh, offset;
    uint32_t size, flags;
};

struct out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

static PyTypeObject *context_type; /* the Context NamedTuple, set by setup() */
static PyObject *defer;            /* the DEFER sentinel, set by setup() */

static int64_t now_ns(void) { /* time.perf_counter_ns(), as Session's tallies count */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

PyDoc_STRVAR(setup_doc,
"setup(context_type, defer, /) -> None\n\n"
"What serve_data hands the file system: ``context_type``, the tuple subclass\n"
"a request's (uid, gid, pid) is made as, and ``defer``, the sentinel that\n"
"means the method left the request to the event loop.");

static PyObject *setup(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[0]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "setup(context_type, defer): a tuple subclass and a sentinel");
        return NULL;
    }
    Py_XSETREF(context_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(defer, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

/* The file descriptor ``arg`` names, or -1 with an exception set (``fn`` says whose). */
static int fd_arg(PyObject *arg, const char *fn) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: not a file descriptor", fn);
        return -1;
    }
    return (int)fd;
}

/* list[i] += by, for a list of ints: 0, or -1 with an exception set. */
static int bump(PyObject *list, Py_ssize_t i, int64_t by) {
    PyObject *old = PyList_GET_ITEM(list, i);
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred())
        return -1;
    PyObject *n = PyLong_FromLongLong(v + by);
    if (n == NULL)
        return -1;
    PyList_SET_ITEM(list, i, n);
    Py_DECREF(old);
    return 0;
}

/* The Context of a request: the NamedTuple made as tuple.__new__ makes it. */
static PyObject *make_context(const struct in_header *h) {
    PyObject *ctx = context_type->tp_alloc(context_type, 3);
    if (ctx == NULL)
        return NULL;
    uint32_t ids[3] = {h->uid, h->gid, h->pid};
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyLong_FromUnsignedLong(ids[i]);
        if (v == NULL) {
            Py_DECREF(ctx);
            return NULL;
        }
        PyTuple_SET_ITEM(ctx, i, v);
    }
    return ctx;
}

/* Call the method for a READ (ctx, nodeid, fh, offset, size) or a WRITE
 * (ctx, nodeid, fh, offset, the data as a view of req): a new reference,
 * or NULL with the exception set. */
static PyObject *call_method(PyObject *method, PyObject *req, const struct in_header *h,
                             const struct data_in *d) {
    PyObject *a[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    /* made one after the other: no call into Python with an exception pending */
    if ((a[0] = make_context(h)) && (a[1] = PyLong_FromUnsignedLongLong(h->nodeid)) &&
        (a[2] = PyLong_FromUnsignedLongLong(d->fh)) && (a[3] = PyLong_FromUnsignedLongLong(d->offset)) &&
        (a[4] = h->opcode == OP_READ ? PyLong_FromUnsignedLong(d->size)
                                     : PySequence_GetSlice(req, WRITE_DATA_AT,
                                                           WRITE_DATA_AT + (Py_ssize_t)d->size)))
        result = PyObject_Vectorcall(method, a, 5, NULL);
    for (int i = 0; i < 5; i++)
        Py_XDECREF(a[i]);
    return result;
}

/* One reply, written whole: 0, or the errno of a failure the session should
 * hear of (ENOENT, the request was aborted meanwhile, and the connection
 * gone are not). */
static int write_reply(int fd, uint64_t unique, const void *payload, Py_ssize_t n) {
    struct out_header out = {(uint32_t)(OUT_HEADER_BYTES + n), 0, unique};
    struct iovec iov[2] = {{&out, OUT_HEADER_BYTES}, {(void *)payload, (size_t)n}};
    ssize_t w;
    int err;
    Py_BEGIN_ALLOW_THREADS
    do {
        w = writev(fd, iov, n ? 2 : 1);
    } while (w < 0 && errno == EINTR);
    err = w < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    return err == ENOENT || err == ENODEV || err == ECONNABORTED ? 0 : err;
}

PyDoc_STRVAR(serve_data_doc,
"serve_data(fd, req, read, write, fail, tally, count, data, ns, /) -> int\n\n"
"Serve ``req`` (a request read from ``fd``) if it is a READ or a WRITE whose\n"
"header and size check (the length is the request's, no extensions, a\n"
"WRITE's data all there): call ``read(ctx, nodeid, fh, offset, size)`` or\n"
"``write(ctx, nodeid, fh, offset, data)``, answer with what it returned on\n"
"``fd``, and count the request, its bytes and its nanoseconds in\n"
"``count``, ``data`` and ``ns`` (the tally's lists, by opcode).  If the\n"
"method raises an Exception, ``fail(e, unique, opcode, fd, tally, t0)``\n"
"answers it.  Returns 0 if ``req`` is not such a request (nothing done),\n"
"1 once it is answered, 2 if the method returned DEFER (nothing answered),\n"
"1000 + errno if the reply could not be written.");

static PyObject *serve_data(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "serve_data takes 9 arguments, not %zd", nargs);
        return NULL;
    }
    if (context_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "serve_data before setup()");
        return NULL;
    }
    int64_t t0 = now_ns(); /* from parsing on, as Session._serve_here counts */
    int fd = fd_arg(args[0], "serve_data");
    if (fd < 0)
        return NULL;
    PyObject *count = args[6], *data = args[7], *ns = args[8];
    if (!PyList_CheckExact(count) || !PyList_CheckExact(data) || !PyList_CheckExact(ns) ||
        PyList_GET_SIZE(count) <= OP_WRITE || PyList_GET_SIZE(data) <= OP_WRITE ||
        PyList_GET_SIZE(ns) <= OP_WRITE) {
        PyErr_SetString(PyExc_TypeError, "serve_data: the tally's lists, one item an opcode");
        return NULL;
    }
    Py_buffer in;
    if (PyObject_GetBuffer(args[1], &in, PyBUF_SIMPLE) < 0)
        return NULL;
    struct in_header h;
    struct data_in d;
    if (in.len < DATA_IN_BYTES) {
        PyBuffer_Release(&in);
        return PyLong_FromLong(NOT_MINE);
    }
    memcpy(&h, in.buf, sizeof h);
    memcpy(&d, (const char *)in.buf + IN_HEADER_BYTES, sizeof d);
    if (h.len != (uint64_t)in.len || h.total_extlen ||
        !(h.opcode == OP_READ ||
          (h.opcode == OP_WRITE && (uint64_t)in.len >= WRITE_DATA_AT + (uint64_t)d.size))) {
        PyBuffer_Release(&in);
        return PyLong_FromLong(NOT_MINE);
    }
    PyObject *result = call_method(args[h.opcode == OP_READ ? 2 : 3], args[1], &h, &d);
    PyBuffer_Release(&in);
    if (result == defer) {
        Py_DECREF(result);
        return PyLong_FromLong(DEFERRED);
    }
    int err = 0;
    Py_ssize_t moved = 0;
    if (result != NULL && h.opcode == OP_READ) { /* the data read, as a buffer */
        Py_buffer out;
        if (PyObject_GetBuffer(result, &out, PyBUF_SIMPLE) < 0) {
            Py_CLEAR(result);
        } else {
            moved = out.len;
            err = write_reply(fd, h.unique, out.buf, out.len);
            PyBuffer_Release(&out);
        }
    } else if (result != NULL) { /* how many bytes were written, answered as fuse_write_out */
        moved = PyNumber_AsSsize_t(result, PyExc_OverflowError);
        if (!(moved == -1 && PyErr_Occurred()) && (moved < 0 || moved > UINT32_MAX))
            PyErr_Format(PyExc_ValueError, "a write of %zd bytes cannot be answered", moved);
        if (PyErr_Occurred()) {
            Py_CLEAR(result);
        } else {
            uint32_t written[2] = {(uint32_t)moved, 0};
            err = write_reply(fd, h.unique, written, sizeof written);
        }
    }
    if (result == NULL) { /* the method, or its result, failed: fail answers */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL; /* KeyboardInterrupt and the like go up, as in Python */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        PyObject *done = PyObject_CallFunction(args[4], "OKIiOL", value, (unsigned long long)h.unique,
                                               (unsigned int)h.opcode, fd, args[5], (long long)t0);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (done == NULL)
            return NULL;
        Py_DECREF(done);
        return PyLong_FromLong(SERVED);
    }
    Py_DECREF(result);
    if (bump(count, h.opcode, 1) < 0 || bump(data, h.opcode, moved) < 0 ||
        bump(ns, h.opcode, now_ns() - t0) < 0)
        return NULL;
    return PyLong_FromLong(err ? REPLY_FAILED + err : SERVED);
}

PyDoc_STRVAR(read_request_doc,
"read_request(fd, buf, /) -> int\n\n"
"One read(2) of ``fd`` into the writable buffer ``buf``, the GIL released:\n"
"the bytes read, or minus the errno (EAGAIN where a non-blocking fd has\n"
"nothing, EINTR, ENODEV once the connection is gone, ...).  No exception\n"
"for a failed read: only for arguments that are not an fd and a buffer.");

static PyObject *read_request(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "read_request takes 2 arguments, not %zd", nargs);
        return NULL;
    }
    int fd = fd_arg(args[0], "read_request");
    if (fd < 0)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_WRITABLE) < 0)
        return NULL;
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = read(fd, buf.buf, (size_t)buf.len);
    if (n < 0)
        n = -(ssize_t)errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_FASTCALL, setup_doc},
    {"read_request", (PyCFunction)(void (*)(void))read_request, METH_FASTCALL, read_request_doc},
    {"serve_data", (PyCFunction)(void (*)(void))serve_data, METH_FASTCALL, serve_data_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_wire", "A channel thread's READ and WRITE in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (m != NULL && (PyModule_AddIntConstant(m, "NOT_MINE", NOT_MINE) < 0 ||
                      PyModule_AddIntConstant(m, "SERVED", SERVED) < 0 ||
                      PyModule_AddIntConstant(m, "DEFERRED", DEFERRED) < 0 ||
                      PyModule_AddIntConstant(m, "REPLY_FAILED", REPLY_FAILED) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
