/* check.c: argument validation for the Python bindings; see check.h. */
#include "check.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static void format_shape(char *buf, size_t size, int ndim, const npy_intp *shape)
{
    size_t used = 0;
    used += (size_t)snprintf(buf + used, size - used, "(");
    for (int i = 0; i < ndim && used < size; i++) {
        if (shape[i] == ANY_DIM) {
            used += (size_t)snprintf(buf + used, size - used, "%s*", i ? ", " : "");
        } else {
            used += (size_t)snprintf(buf + used, size - used, "%s%ld", i ? ", " : "",
                                     (long)shape[i]);
        }
    }
    if (used < size) {
        snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
    }
}

static const char *dtype_name(int typenum)
{
    switch (typenum) {
    case NPY_FLOAT32: return "float32";
    case NPY_FLOAT64: return "float64";
    case NPY_INT32: return "int32";
    case NPY_INT64: return "int64";
    case NPY_UINT16: return "uint16";
    default: return "another dtype";
    }
}

PyArrayObject *check_array(PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape, int writable)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of dtype %s, got %s",
                     name, dtype_name(typenum), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;

    if (PyArray_TYPE(arr) != typenum) {
        PyErr_Format(PyExc_TypeError,
                     "%s must have dtype %s, got %s; convert it with .astype(numpy.%s)",
                     name, dtype_name(typenum), dtype_name(PyArray_TYPE(arr)),
                     dtype_name(typenum));
        return NULL;
    }
    /* A byte-swapped array has the same type number, but the C code would read garbage. */
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError,
                     "%s has a non-native byte order; convert it with .astype(numpy.%s)", name,
                     dtype_name(typenum));
        return NULL;
    }

    char expected[160], got[160];
    if (PyArray_NDIM(arr) != ndim) {
        format_shape(expected, sizeof expected, ndim, shape);
        format_shape(got, sizeof got, PyArray_NDIM(arr), PyArray_DIMS(arr));
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions with shape %s, got shape %s",
                     name, ndim, expected, got);
        return NULL;
    }
    for (int i = 0; i < ndim; i++) {
        if (shape[i] != ANY_DIM && PyArray_DIM(arr, i) != shape[i]) {
            format_shape(expected, sizeof expected, ndim, shape);
            format_shape(got, sizeof got, ndim, PyArray_DIMS(arr));
            PyErr_Format(PyExc_ValueError, "%s must have shape %s, got %s", name, expected,
                         got);
            return NULL;
        }
    }

    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be C-contiguous and aligned; pass numpy.ascontiguousarray(%s)",
                     name, name);
        return NULL;
    }
    if (writable && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s is read-only but is written to; pass a writable copy (%s.copy())",
                     name, name);
        return NULL;
    }
    return arr;
}

PyArrayObject *check_optional_array(PyObject *obj, const char *name, int typenum,
                                    int ndim, const npy_intp *shape, int writable,
                                    int *ok)
{
    *ok = 1;
    if (obj == NULL || obj == Py_None) {
        return NULL;
    }
    PyArrayObject *arr = check_array(obj, name, typenum, ndim, shape, writable);
    if (arr == NULL) {
        *ok = 0;
    }
    return arr;
}

int check_index_range(const int32_t *ids, const float *weights, npy_intp n, int32_t limit,
                      const char *name)
{
    for (npy_intp i = 0; i < n; i++) {
        if (weights != NULL && weights[i] == 0.0f) {
            continue;
        }
        if (ids[i] < 0 || ids[i] >= limit) {
            PyErr_Format(PyExc_ValueError,
                         "%s[%zd] = %d is out of range: ids must lie in [0, %d)", name,
                         (Py_ssize_t)i, (int)ids[i], (int)limit);
            return -1;
        }
    }
    return 0;
}

int check_finite_scalar(double x, const char *name)
{
    if (!isfinite(x)) {
        char text[32];
        snprintf(text, sizeof text, "%g", x);
        PyErr_Format(PyExc_ValueError, "%s must be a finite number, got %s", name, text);
        return -1;
    }
    return 0;
}

int check_finite_array(const float *x, npy_intp n, const char *name)
{
    for (npy_intp i = 0; i < n; i++) {
        if (!isfinite(x[i])) {
            PyErr_Format(PyExc_ValueError, "%s contains a non-finite value at flat index %zd",
                         name, (Py_ssize_t)i);
            return -1;
        }
    }
    return 0;
}
