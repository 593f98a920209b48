/*
 * check.h: argument validation shared by the Python bindings.
 *
 * Every array handed to the C core passes through check_array first, so the
 * numeric code in ops.c and model.c can assume the right dtype, shape,
 * contiguity and writability. On failure these functions set a Python
 * exception (TypeError or ValueError) whose message names the argument, what
 * was expected and what was received, and return NULL or -1.
 */
#ifndef SKUPY_CHECK_H
#define SKUPY_CHECK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* One NumPy C API table for the whole extension: module.c imports it and the
 * other translation units reuse it. */
#define PY_ARRAY_UNIQUE_SYMBOL skupy_ARRAY_API
#ifndef SKUPY_MODULE_MAIN
#define NO_IMPORT_ARRAY
#endif
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdint.h>

/* Wildcard for one dimension in a shape passed to check_array. */
#define ANY_DIM (-1)

/* Validates that obj is a NumPy array of dtype typenum (NPY_FLOAT32 or
 * NPY_INT32) in native byte order, with ndim dimensions matching shape
 * (ANY_DIM entries match any size), C-contiguous, aligned, and writable when
 * writable != 0.
 * Returns a borrowed PyArrayObject* or NULL with an exception set.
 * name is the argument name used in the message. */
PyArrayObject *check_array(PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape, int writable);

/* Like check_array, but None is accepted and yields NULL with no exception;
 * *ok is set to 0 on error and 1 otherwise. */
PyArrayObject *check_optional_array(PyObject *obj, const char *name, int typenum,
                                    int ndim, const npy_intp *shape, int writable,
                                    int *ok);

/* Raises ValueError unless every entry of ids (n int32) lies in [0, limit).
 * Entries whose weight is 0 are not checked when weights is not NULL.
 * Returns 0 on success, -1 with an exception set. */
int check_index_range(const int32_t *ids, const float *weights, npy_intp n,
                      int32_t limit, const char *name);

/* Raises ValueError if x is not finite. Returns 0 or -1. */
int check_finite_scalar(double x, const char *name);

/* Raises ValueError if any of the n floats is NaN or infinite. Returns 0 or -1. */
int check_finite_array(const float *x, npy_intp n, const char *name);

/* Shorthand: pointer to the data of a checked float32 or int32 array. */
#define F32(arr) ((float *)PyArray_DATA(arr))
#define I32(arr) ((int32_t *)PyArray_DATA(arr))

#endif
