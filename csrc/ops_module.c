/*
 * ops_module.c: Python bindings of the tensor ops in ops.h.
 *
 * Each binding validates its arguments, allocates outputs with NumPy, releases
 * the GIL and calls the op, and does nothing more. Every array goes through
 * check_array (dtype, exact shape, C-contiguous, writable where written), so
 * ops.c can trust its inputs. Token ids are range-checked, dimensions must be
 * at least 1 and fit in an int, and float scalars must be finite.
 *
 * Backward bindings return fresh zero-initialized gradients. A gradient array
 * passed by keyword (dinp=..., dw=...) is accumulated into in place and
 * returned instead, which is how the += contract of ops.h is exercised from
 * Python. Such an array must not share memory with any input.
 */
#include "check.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "ops.h"

static const npy_intp ANY1[1] = {ANY_DIM};
static const npy_intp ANY2[2] = {ANY_DIM, ANY_DIM};
static const npy_intp ANY3[3] = {ANY_DIM, ANY_DIM, ANY_DIM};
static const npy_intp ANY4[4] = {ANY_DIM, ANY_DIM, ANY_DIM, ANY_DIM};

/* ---------------------------------------------------------------------- */
/* Validation helpers                                                     */
/* ---------------------------------------------------------------------- */

/* Raises ValueError unless every dimension of arr lies in [1, INT_MAX].
 * dim_names gives the letter of each dimension for the message. */
static int check_dims(PyArrayObject *arr, const char *name, const char *const *dim_names)
{
    for (int i = 0; i < PyArray_NDIM(arr); i++) {
        npy_intp size = PyArray_DIM(arr, i);
        if (size < 1) {
            PyErr_Format(PyExc_ValueError, "%s must have %s >= 1 (dimension %d), got %s = %zd",
                         name, dim_names[i], i, dim_names[i], (Py_ssize_t)size);
            return -1;
        }
        if (size > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s has %s = %zd (dimension %d), above the maximum %d",
                         name, dim_names[i], (Py_ssize_t)size, i, INT_MAX);
            return -1;
        }
    }
    return 0;
}

/* Checks a float32 array of any number of dimensions and at least one element,
 * as the pointwise ops take. */
static PyArrayObject *check_any_shape(PyObject *obj, const char *name, int writable)
{
    if (!PyArray_Check(obj)) {
        return check_array(obj, name, NPY_FLOAT32, 1, ANY1, writable);  // raises TypeError
    }
    int ndim = PyArray_NDIM((PyArrayObject *)obj);
    npy_intp shape[NPY_MAXDIMS];
    for (int i = 0; i < ndim; i++) {
        shape[i] = ANY_DIM;
    }
    PyArrayObject *arr = check_array(obj, name, NPY_FLOAT32, ndim, shape, writable);
    if (arr != NULL && PyArray_SIZE(arr) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must have at least one element, got an empty array",
                     name);
        return NULL;
    }
    return arr;
}

/* Stores x as a float in *out, raising ValueError unless x is finite and
 * within the float32 range. */
static int to_finite_float(double x, const char *name, float *out)
{
    if (check_finite_scalar(x, name) < 0) {
        return -1;
    }
    if (fabs(x) > FLT_MAX) {
        char text[32];
        snprintf(text, sizeof text, "%g", x);
        PyErr_Format(PyExc_ValueError, "%s = %s is outside the float32 range", name, text);
        return -1;
    }
    *out = (float)x;
    return 0;
}

/* Raises ValueError "<name> must <requirement>, got <x>". Returns -1. */
static int raise_bad_scalar(const char *name, const char *requirement, double x)
{
    char text[32];
    snprintf(text, sizeof text, "%g", x);
    PyErr_Format(PyExc_ValueError, "%s must %s, got %s", name, requirement, text);
    return -1;
}

/* Stores obj as a double in *out. Raises a TypeError that names the argument
 * unless obj is a real number (a Python or NumPy int or float, or any object
 * with __float__). */
static int parse_real(PyObject *obj, const char *name, double *out)
{
    double x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Format(PyExc_TypeError, "%s must be a real number, got %s", name,
                         Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    *out = x;
    return 0;
}

/* Stores obj as a float in *out: a real number, finite and within the float32
 * range, or ValueError / TypeError naming the argument. */
static int parse_finite_float(PyObject *obj, const char *name, float *out)
{
    double x;
    if (parse_real(obj, name, &x) < 0) {
        return -1;
    }
    return to_finite_float(x, name, out);
}

/* Stores obj as an int in *out. Raises TypeError unless obj is an integer
 * (anything with __index__), and ValueError outside the range of a C int. */
static int parse_int(PyObject *obj, const char *name, int *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (index == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow != 0 || value < INT_MIN || value > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s is outside the range of a C int [%d, %d]", name,
                     INT_MIN, INT_MAX);
        return -1;
    }
    *out = (int)value;
    return 0;
}

/* Converts an optional scale argument: None gives default_value, anything else
 * must be a finite real number. */
static int parse_scale(PyObject *obj, double default_value, float *out)
{
    if (obj == NULL || obj == Py_None) {
        *out = (float)default_value;
        return 0;
    }
    return parse_finite_float(obj, "scale", out);
}

static int arrays_overlap(PyArrayObject *a, PyArrayObject *b)
{
    if (a == NULL || b == NULL) {
        return 0;
    }
    uintptr_t a0 = (uintptr_t)PyArray_BYTES(a), a1 = a0 + (uintptr_t)PyArray_NBYTES(a);
    uintptr_t b0 = (uintptr_t)PyArray_BYTES(b), b1 = b0 + (uintptr_t)PyArray_NBYTES(b);
    return a0 < b1 && b0 < a1;
}

/* Raises ValueError if the written array out shares memory with any of the
 * count arrays in inputs (NULL entries are skipped). */
static int check_no_overlap(PyArrayObject *out, const char *out_name,
                            PyArrayObject *const *inputs, const char *const *input_names,
                            int count)
{
    for (int i = 0; i < count; i++) {
        if (arrays_overlap(out, inputs[i])) {
            PyErr_Format(PyExc_ValueError,
                         "%s shares memory with %s but is written to; pass a separate array",
                         out_name, input_names[i]);
            return -1;
        }
    }
    return 0;
}

/* Returns a new reference to the gradient array to accumulate into: obj after
 * checking that it is a writable float32 array of exactly this shape, or a
 * fresh array of zeros when obj is None or NULL. */
static PyArrayObject *gradient_output(PyObject *obj, const char *name, int ndim,
                                      const npy_intp *shape)
{
    if (obj == NULL || obj == Py_None) {
        return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)shape, NPY_FLOAT32, 0);
    }
    PyArrayObject *arr = check_array(obj, name, NPY_FLOAT32, ndim, shape, 1);
    Py_XINCREF(arr);
    return arr;
}

static PyArrayObject *new_float_array(int ndim, const npy_intp *shape)
{
    return (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)shape, NPY_FLOAT32, 0);
}

/* Same as gradient_output for an array that was passed in, with an overlap
 * check against the inputs. */
static PyArrayObject *checked_gradient(PyObject *obj, const char *name, int ndim,
                                       const npy_intp *shape, PyArrayObject *const *inputs,
                                       const char *const *input_names, int count)
{
    PyArrayObject *arr = gradient_output(obj, name, ndim, shape);
    if (arr != NULL && obj != NULL && obj != Py_None &&
        check_no_overlap(arr, name, inputs, input_names, count) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* Raises ValueError if two gradient outputs share memory. */
static int check_gradients_disjoint(PyArrayObject *a, const char *a_name, PyArrayObject *b,
                                    const char *b_name)
{
    if (a != NULL && b != NULL && arrays_overlap(a, b)) {
        PyErr_Format(PyExc_ValueError, "%s and %s share memory; pass separate arrays", a_name,
                     b_name);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Embedding                                                              */
/* ---------------------------------------------------------------------- */

PyDoc_STRVAR(embedding_forward_doc,
"embedding_forward(tokens, wte) -> out\n\n"
"Look up rows of an embedding table: out[n] = wte[tokens[n]].\n"
"tokens: int32 (N,); wte: float32 (V, C); out: float32 (N, C).\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension or a token id outside [0, V).");

/* Returns a new reference to a private copy of arr, or NULL with an exception.
 * Index arrays are checked and used through such copies, because another
 * thread could change the caller's array while the GIL is released. */
static PyArrayObject *private_copy(PyArrayObject *arr)
{
    return (PyArrayObject *)PyArray_NewCopy(arr, NPY_CORDER);
}

static PyObject *py_embedding_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"tokens", "wte", NULL};
    PyObject *tokens_obj, *wte_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:embedding_forward", kwlist,
                                     &tokens_obj, &wte_obj)) {
        return NULL;
    }
    PyArrayObject *tokens = check_array(tokens_obj, "tokens", NPY_INT32, 1, ANY1, 0);
    if (tokens == NULL || check_dims(tokens, "tokens", (const char *[]){"N"}) < 0) {
        return NULL;
    }
    PyArrayObject *wte = check_array(wte_obj, "wte", NPY_FLOAT32, 2, ANY2, 0);
    if (wte == NULL || check_dims(wte, "wte", (const char *[]){"V", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(tokens, 0);
    int V = (int)PyArray_DIM(wte, 0), C = (int)PyArray_DIM(wte, 1);
    PyArrayObject *ids = private_copy(tokens);
    if (ids == NULL) {
        return NULL;
    }
    npy_intp out_shape[2] = {N, C};
    PyArrayObject *out = NULL;
    if (check_index_range(I32(ids), NULL, N, V, "tokens") == 0) {
        out = new_float_array(2, out_shape);
    }
    if (out != NULL) {
        Py_BEGIN_ALLOW_THREADS
        embedding_forward(F32(out), I32(ids), F32(wte), N, C);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(ids);
    return (PyObject *)out;
}

PyDoc_STRVAR(embedding_backward_doc,
"embedding_backward(dout, tokens, vocab_size, dwte=None) -> dwte\n\n"
"Scatter-add the output gradient into the table gradient: dwte[tokens[n]] += dout[n].\n"
"dout: float32 (N, C); tokens: int32 (N,); dwte: float32 (vocab_size, C),\n"
"fresh zeros unless an array is passed to accumulate into.\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension, vocab_size < 1, a token id outside [0, vocab_size), or a dwte\n"
"that is read-only or shares memory with an input.");

static PyObject *py_embedding_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "tokens", "vocab_size", "dwte", NULL};
    PyObject *dout_obj, *tokens_obj, *vocab_obj, *dwte_obj = Py_None;
    int V;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O:embedding_backward", kwlist,
                                     &dout_obj, &tokens_obj, &vocab_obj, &dwte_obj) ||
        parse_int(vocab_obj, "vocab_size", &V) < 0) {
        return NULL;
    }
    PyArrayObject *dout = check_array(dout_obj, "dout", NPY_FLOAT32, 2, ANY2, 0);
    if (dout == NULL || check_dims(dout, "dout", (const char *[]){"N", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(dout, 0), C = (int)PyArray_DIM(dout, 1);
    npy_intp tokens_shape[1] = {N};
    PyArrayObject *tokens = check_array(tokens_obj, "tokens", NPY_INT32, 1, tokens_shape, 0);
    if (tokens == NULL) {
        return NULL;
    }
    if (V < 1) {
        PyErr_Format(PyExc_ValueError, "vocab_size must be at least 1, got %d", V);
        return NULL;
    }
    PyArrayObject *ids = private_copy(tokens);
    if (ids == NULL) {
        return NULL;
    }
    if (check_index_range(I32(ids), NULL, N, V, "tokens") < 0) {
        Py_DECREF(ids);
        return NULL;
    }

    npy_intp dwte_shape[2] = {V, C};
    PyArrayObject *inputs[] = {dout, tokens};
    const char *names[] = {"dout", "tokens"};
    PyArrayObject *dwte = checked_gradient(dwte_obj, "dwte", 2, dwte_shape, inputs, names, 2);
    if (dwte != NULL) {
        Py_BEGIN_ALLOW_THREADS
        embedding_backward(F32(dwte), F32(dout), I32(ids), N, C);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(ids);
    return (PyObject *)dwte;
}

/* ---------------------------------------------------------------------- */
/* Linear                                                                 */
/* ---------------------------------------------------------------------- */

PyDoc_STRVAR(linear_forward_doc,
"linear_forward(inp, w, bias=None) -> out\n\n"
"Apply a linear layer: out = inp @ w.T + bias, w in the PyTorch (OC, IC) layout.\n"
"inp: float32 (N, IC); w: float32 (OC, IC); bias: float32 (OC,) or None;\n"
"out: float32 (N, OC).\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape or a zero\n"
"dimension.");

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"inp", "w", "bias", NULL};
    PyObject *inp_obj, *w_obj, *bias_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:linear_forward", kwlist, &inp_obj,
                                     &w_obj, &bias_obj)) {
        return NULL;
    }
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, ANY2, 0);
    if (inp == NULL || check_dims(inp, "inp", (const char *[]){"N", "IC"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(inp, 0), IC = (int)PyArray_DIM(inp, 1);
    npy_intp w_shape[2] = {ANY_DIM, IC};
    PyArrayObject *w = check_array(w_obj, "w", NPY_FLOAT32, 2, w_shape, 0);
    if (w == NULL || check_dims(w, "w", (const char *[]){"OC", "IC"}) < 0) {
        return NULL;
    }
    int OC = (int)PyArray_DIM(w, 0);
    npy_intp bias_shape[1] = {OC};
    int ok;
    PyArrayObject *bias =
        check_optional_array(bias_obj, "bias", NPY_FLOAT32, 1, bias_shape, 0, &ok);
    if (!ok) {
        return NULL;
    }

    npy_intp out_shape[2] = {N, OC};
    PyArrayObject *out = new_float_array(2, out_shape);
    if (out == NULL) {
        return NULL;
    }
    const float *bias_data = bias != NULL ? F32(bias) : NULL;
    Py_BEGIN_ALLOW_THREADS
    linear_forward(F32(out), F32(inp), F32(w), bias_data, N, IC, OC, 0);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

PyDoc_STRVAR(linear_backward_doc,
"linear_backward(dout, inp, w, need_bias_grad=True, dinp=None, dw=None, dbias=None)\n"
"    -> (dinp, dw, dbias)\n\n"
"Backpropagate through out = inp @ w.T + bias: dinp += dout @ w,\n"
"dw += dout.T @ inp, dbias += dout summed over rows.\n"
"dout: float32 (N, OC); inp: float32 (N, IC); w: float32 (OC, IC).\n"
"Returns dinp (N, IC), dw (OC, IC) and dbias (OC,), or None for dbias when\n"
"need_bias_grad is false. Gradients are fresh zeros unless arrays are passed\n"
"to accumulate into.\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension, dbias passed with need_bias_grad false, or a gradient array that is\n"
"read-only or shares memory with an input or another gradient.");

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "inp", "w", "need_bias_grad", "dinp", "dw", "dbias", NULL};
    PyObject *dout_obj, *inp_obj, *w_obj;
    PyObject *dinp_obj = Py_None, *dw_obj = Py_None, *dbias_obj = Py_None;
    int need_bias_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|pOOO:linear_backward", kwlist,
                                     &dout_obj, &inp_obj, &w_obj, &need_bias_grad, &dinp_obj,
                                     &dw_obj, &dbias_obj)) {
        return NULL;
    }
    PyArrayObject *dout = check_array(dout_obj, "dout", NPY_FLOAT32, 2, ANY2, 0);
    if (dout == NULL || check_dims(dout, "dout", (const char *[]){"N", "OC"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(dout, 0), OC = (int)PyArray_DIM(dout, 1);
    npy_intp inp_shape[2] = {N, ANY_DIM};
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, inp_shape, 0);
    if (inp == NULL || check_dims(inp, "inp", (const char *[]){"N", "IC"}) < 0) {
        return NULL;
    }
    int IC = (int)PyArray_DIM(inp, 1);
    npy_intp w_shape[2] = {OC, IC};
    PyArrayObject *w = check_array(w_obj, "w", NPY_FLOAT32, 2, w_shape, 0);
    if (w == NULL) {
        return NULL;
    }
    if (!need_bias_grad && dbias_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "dbias was passed but need_bias_grad is false; pass need_bias_grad=True");
        return NULL;
    }

    PyArrayObject *inputs[] = {dout, inp, w};
    const char *names[] = {"dout", "inp", "w"};
    npy_intp dinp_shape[2] = {N, IC};
    npy_intp dbias_shape[1] = {OC};
    PyArrayObject *dinp = NULL, *dw = NULL, *dbias = NULL;
    dinp = checked_gradient(dinp_obj, "dinp", 2, dinp_shape, inputs, names, 3);
    if (dinp == NULL) {
        goto fail;
    }
    dw = checked_gradient(dw_obj, "dw", 2, w_shape, inputs, names, 3);
    if (dw == NULL) {
        goto fail;
    }
    if (need_bias_grad) {
        dbias = checked_gradient(dbias_obj, "dbias", 1, dbias_shape, inputs, names, 3);
        if (dbias == NULL) {
            goto fail;
        }
    }
    if (check_gradients_disjoint(dinp, "dinp", dw, "dw") < 0 ||
        check_gradients_disjoint(dinp, "dinp", dbias, "dbias") < 0 ||
        check_gradients_disjoint(dw, "dw", dbias, "dbias") < 0) {
        goto fail;
    }

    float *dbias_data = dbias != NULL ? F32(dbias) : NULL;
    Py_BEGIN_ALLOW_THREADS
    linear_backward(F32(dinp), F32(dw), dbias_data, F32(dout), F32(inp), F32(w), N, IC, OC);
    Py_END_ALLOW_THREADS
    if (dbias == NULL) {
        return Py_BuildValue("(NNO)", dinp, dw, Py_None);
    }
    return Py_BuildValue("(NNN)", dinp, dw, dbias);

fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    Py_XDECREF(dbias);
    return NULL;
}

/* ---------------------------------------------------------------------- */
/* LayerNorm and RMSNorm                                                  */
/* ---------------------------------------------------------------------- */

/* Parses eps, which must be a finite positive number. */
static int parse_eps(PyObject *obj, float *out)
{
    double eps;
    if (parse_real(obj, "eps", &eps) < 0 || to_finite_float(eps, "eps", out) < 0) {
        return -1;
    }
    if (*out <= 0.0f) {
        return raise_bad_scalar("eps", "be positive", eps);
    }
    return 0;
}

PyDoc_STRVAR(layernorm_forward_doc,
"layernorm_forward(inp, w, b, eps) -> (out, mean, rstd)\n\n"
"Normalize each row: out = (inp - mean) * rstd * w + b, with the biased variance.\n"
"inp: float32 (N, C); w: float32 (C,); b: float32 (C,) or None (no bias);\n"
"eps > 0. Returns out (N, C), mean (N,) and rstd (N,) = 1 / sqrt(var + eps).\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension or an eps that is not finite and positive.");

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"inp", "w", "b", "eps", NULL};
    PyObject *inp_obj, *w_obj, *b_obj, *eps_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO:layernorm_forward", kwlist, &inp_obj,
                                     &w_obj, &b_obj, &eps_obj)) {
        return NULL;
    }
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, ANY2, 0);
    if (inp == NULL || check_dims(inp, "inp", (const char *[]){"N", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    npy_intp c_shape[1] = {C};
    PyArrayObject *w = check_array(w_obj, "w", NPY_FLOAT32, 1, c_shape, 0);
    if (w == NULL) {
        return NULL;
    }
    int ok;
    PyArrayObject *b = check_optional_array(b_obj, "b", NPY_FLOAT32, 1, c_shape, 0, &ok);
    float eps;
    if (!ok || parse_eps(eps_obj, &eps) < 0) {
        return NULL;
    }

    npy_intp out_shape[2] = {N, C};
    npy_intp row_shape[1] = {N};
    PyArrayObject *out = new_float_array(2, out_shape);
    PyArrayObject *mean = new_float_array(1, row_shape);
    PyArrayObject *rstd = new_float_array(1, row_shape);
    if (out == NULL || mean == NULL || rstd == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(mean);
        Py_XDECREF(rstd);
        return NULL;
    }
    const float *b_data = b != NULL ? F32(b) : NULL;
    Py_BEGIN_ALLOW_THREADS
    layernorm_forward(F32(out), F32(mean), F32(rstd), F32(inp), F32(w), b_data, N, C, eps);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NNN)", out, mean, rstd);
}

PyDoc_STRVAR(layernorm_backward_doc,
"layernorm_backward(dout, inp, w, mean, rstd, need_bias_grad=True, dinp=None,\n"
"                   dw=None, db=None) -> (dinp, dw, db)\n\n"
"Backpropagate through layernorm_forward, using its saved mean and rstd.\n"
"dout, inp: float32 (N, C); w: float32 (C,); mean, rstd: float32 (N,).\n"
"Returns dinp (N, C), dw (C,) and db (C,), or None for db when need_bias_grad\n"
"is false (a LayerNorm without bias). Gradients are fresh zeros unless arrays\n"
"are passed to accumulate into.\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension, db passed with need_bias_grad false, or a gradient array that is\n"
"read-only or shares memory with an input or another gradient.");

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "inp", "w", "mean", "rstd", "need_bias_grad",
                             "dinp", "dw", "db", NULL};
    PyObject *dout_obj, *inp_obj, *w_obj, *mean_obj, *rstd_obj;
    PyObject *dinp_obj = Py_None, *dw_obj = Py_None, *db_obj = Py_None;
    int need_bias_grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|pOOO:layernorm_backward", kwlist,
                                     &dout_obj, &inp_obj, &w_obj, &mean_obj, &rstd_obj,
                                     &need_bias_grad, &dinp_obj, &dw_obj, &db_obj)) {
        return NULL;
    }
    PyArrayObject *dout = check_array(dout_obj, "dout", NPY_FLOAT32, 2, ANY2, 0);
    if (dout == NULL || check_dims(dout, "dout", (const char *[]){"N", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(dout, 0), C = (int)PyArray_DIM(dout, 1);
    npy_intp nc_shape[2] = {N, C};
    npy_intp c_shape[1] = {C};
    npy_intp n_shape[1] = {N};
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, nc_shape, 0);
    PyArrayObject *w = inp ? check_array(w_obj, "w", NPY_FLOAT32, 1, c_shape, 0) : NULL;
    PyArrayObject *mean = w ? check_array(mean_obj, "mean", NPY_FLOAT32, 1, n_shape, 0) : NULL;
    PyArrayObject *rstd = mean ? check_array(rstd_obj, "rstd", NPY_FLOAT32, 1, n_shape, 0) : NULL;
    if (rstd == NULL) {
        return NULL;
    }
    if (!need_bias_grad && db_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError,
                        "db was passed but need_bias_grad is false; pass need_bias_grad=True");
        return NULL;
    }

    PyArrayObject *inputs[] = {dout, inp, w, mean, rstd};
    const char *names[] = {"dout", "inp", "w", "mean", "rstd"};
    PyArrayObject *dinp = NULL, *dw = NULL, *db = NULL;
    dinp = checked_gradient(dinp_obj, "dinp", 2, nc_shape, inputs, names, 5);
    if (dinp == NULL) {
        goto fail;
    }
    dw = checked_gradient(dw_obj, "dw", 1, c_shape, inputs, names, 5);
    if (dw == NULL) {
        goto fail;
    }
    if (need_bias_grad) {
        db = checked_gradient(db_obj, "db", 1, c_shape, inputs, names, 5);
        if (db == NULL) {
            goto fail;
        }
    }
    if (check_gradients_disjoint(dinp, "dinp", dw, "dw") < 0 ||
        check_gradients_disjoint(dinp, "dinp", db, "db") < 0 ||
        check_gradients_disjoint(dw, "dw", db, "db") < 0) {
        goto fail;
    }

    float *db_data = db != NULL ? F32(db) : NULL;
    Py_BEGIN_ALLOW_THREADS
    layernorm_backward(F32(dinp), F32(dw), db_data, F32(dout), F32(inp), F32(w), F32(mean),
                       F32(rstd), N, C);
    Py_END_ALLOW_THREADS
    if (db == NULL) {
        return Py_BuildValue("(NNO)", dinp, dw, Py_None);
    }
    return Py_BuildValue("(NNN)", dinp, dw, db);

fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    Py_XDECREF(db);
    return NULL;
}

PyDoc_STRVAR(rmsnorm_forward_doc,
"rmsnorm_forward(inp, w, eps) -> (out, rstd)\n\n"
"Normalize each row as in LLaMA: out = inp * rstd * w, rstd = 1 / sqrt(mean(inp^2) + eps).\n"
"inp: float32 (N, C); w: float32 (C,); eps > 0. Returns out (N, C) and rstd (N,).\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension or an eps that is not finite and positive.");

static PyObject *py_rmsnorm_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"inp", "w", "eps", NULL};
    PyObject *inp_obj, *w_obj, *eps_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:rmsnorm_forward", kwlist, &inp_obj,
                                     &w_obj, &eps_obj)) {
        return NULL;
    }
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, ANY2, 0);
    if (inp == NULL || check_dims(inp, "inp", (const char *[]){"N", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    npy_intp c_shape[1] = {C};
    PyArrayObject *w = check_array(w_obj, "w", NPY_FLOAT32, 1, c_shape, 0);
    float eps;
    if (w == NULL || parse_eps(eps_obj, &eps) < 0) {
        return NULL;
    }

    npy_intp out_shape[2] = {N, C};
    npy_intp row_shape[1] = {N};
    PyArrayObject *out = new_float_array(2, out_shape);
    PyArrayObject *rstd = new_float_array(1, row_shape);
    if (out == NULL || rstd == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(rstd);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rmsnorm_forward(F32(out), F32(rstd), F32(inp), F32(w), N, C, eps);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", out, rstd);
}

PyDoc_STRVAR(rmsnorm_backward_doc,
"rmsnorm_backward(dout, inp, w, rstd, dinp=None, dw=None) -> (dinp, dw)\n\n"
"Backpropagate through rmsnorm_forward, using its saved rstd.\n"
"dout, inp: float32 (N, C); w: float32 (C,); rstd: float32 (N,).\n"
"Returns dinp (N, C) and dw (C,), fresh zeros unless arrays are passed to\n"
"accumulate into.\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension, or a gradient array that is read-only or shares memory with an\n"
"input or another gradient.");

static PyObject *py_rmsnorm_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "inp", "w", "rstd", "dinp", "dw", NULL};
    PyObject *dout_obj, *inp_obj, *w_obj, *rstd_obj;
    PyObject *dinp_obj = Py_None, *dw_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OO:rmsnorm_backward", kwlist,
                                     &dout_obj, &inp_obj, &w_obj, &rstd_obj, &dinp_obj,
                                     &dw_obj)) {
        return NULL;
    }
    PyArrayObject *dout = check_array(dout_obj, "dout", NPY_FLOAT32, 2, ANY2, 0);
    if (dout == NULL || check_dims(dout, "dout", (const char *[]){"N", "C"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(dout, 0), C = (int)PyArray_DIM(dout, 1);
    npy_intp nc_shape[2] = {N, C};
    npy_intp c_shape[1] = {C};
    npy_intp n_shape[1] = {N};
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, 2, nc_shape, 0);
    PyArrayObject *w = inp ? check_array(w_obj, "w", NPY_FLOAT32, 1, c_shape, 0) : NULL;
    PyArrayObject *rstd = w ? check_array(rstd_obj, "rstd", NPY_FLOAT32, 1, n_shape, 0) : NULL;
    if (rstd == NULL) {
        return NULL;
    }

    PyArrayObject *inputs[] = {dout, inp, w, rstd};
    const char *names[] = {"dout", "inp", "w", "rstd"};
    PyArrayObject *dinp = checked_gradient(dinp_obj, "dinp", 2, nc_shape, inputs, names, 4);
    if (dinp == NULL) {
        return NULL;
    }
    PyArrayObject *dw = checked_gradient(dw_obj, "dw", 1, c_shape, inputs, names, 4);
    if (dw == NULL || check_gradients_disjoint(dinp, "dinp", dw, "dw") < 0) {
        Py_DECREF(dinp);
        Py_XDECREF(dw);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rmsnorm_backward(F32(dinp), F32(dw), F32(dout), F32(inp), F32(w), F32(rstd), N, C);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", dinp, dw);
}

/* ---------------------------------------------------------------------- */
/* Rotary position embedding                                              */
/* ---------------------------------------------------------------------- */

typedef void (*rope_fn)(float *, const float *, const float *, int, int, int, int);

/* Shared body of rope_forward and rope_backward: both rotate a copy of x. */
static PyObject *run_rope(PyObject *args, PyObject *kwargs, const char *format,
                          char **kwlist, rope_fn fn)
{
    const char *x_name = kwlist[0];
    PyObject *x_obj, *cos_obj, *sin_obj;
    int interleaved = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist, &x_obj, &cos_obj, &sin_obj,
                                     &interleaved)) {
        return NULL;
    }
    PyArrayObject *x = check_array(x_obj, x_name, NPY_FLOAT32, 3, ANY3, 0);
    if (x == NULL || check_dims(x, x_name, (const char *[]){"N", "NH", "HS"}) < 0) {
        return NULL;
    }
    int N = (int)PyArray_DIM(x, 0), NH = (int)PyArray_DIM(x, 1), HS = (int)PyArray_DIM(x, 2);
    if (HS % 2 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s has an odd head size HS = %d; rotary embedding needs an even HS",
                     x_name, HS);
        return NULL;
    }
    npy_intp angle_shape[2] = {N, HS / 2};
    PyArrayObject *cos = check_array(cos_obj, "cos", NPY_FLOAT32, 2, angle_shape, 0);
    PyArrayObject *sin = cos ? check_array(sin_obj, "sin", NPY_FLOAT32, 2, angle_shape, 0) : NULL;
    if (sin == NULL) {
        return NULL;
    }

    PyArrayObject *out = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
    if (out == NULL) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    fn(F32(out), F32(cos), F32(sin), N, NH, HS, interleaved);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

PyDoc_STRVAR(rope_forward_doc,
"rope_forward(x, cos, sin, interleaved=False) -> out\n\n"
"Rotate query or key vectors by their position's angles, returning a new array.\n"
"x: float32 (N, NH, HS) with HS even (reshape (B, T, NH, HS) to (B*T, NH, HS));\n"
"cos, sin: float32 (N, HS/2), the angle of each frequency at each row's position.\n"
"interleaved=False pairs (i, i + HS/2) as HF LLaMA's rotate_half does;\n"
"interleaved=True pairs (2i, 2i + 1) as GPT-J and llama.cpp do.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension or an odd HS.");

static PyObject *py_rope_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "cos", "sin", "interleaved", NULL};
    return run_rope(args, kwargs, "OOO|p:rope_forward", kwlist, rope_forward);
}

PyDoc_STRVAR(rope_backward_doc,
"rope_backward(dout, cos, sin, interleaved=False) -> dx\n\n"
"Backpropagate through rope_forward: rotate the gradient by the opposite angle,\n"
"returning a new array. Shapes and errors as rope_forward, with dout in place of x.");

static PyObject *py_rope_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "cos", "sin", "interleaved", NULL};
    return run_rope(args, kwargs, "OOO|p:rope_backward", kwlist, rope_backward);
}

/* ---------------------------------------------------------------------- */
/* Attention                                                              */
/* ---------------------------------------------------------------------- */

/* Raises ValueError unless the NH query heads of q_name split evenly over the
 * NKV key/value heads of k_name. */
static int check_head_groups(int NH, int NKV, const char *q_name, const char *k_name)
{
    if (NH % NKV != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s has NH = %d query heads, which is not a multiple of the NKV = %d "
                     "key/value heads of %s",
                     q_name, NH, NKV, k_name);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(attention_forward_doc,
"attention_forward(q, k, v, key_mask=None, q_offset=0, scale=None) -> (out, att)\n\n"
"Causal multi-head attention with grouped-query heads and a key padding mask.\n"
"q: float32 (B, Tq, NH, HS); k, v: float32 (B, Tk, NKV, HS), NH a multiple of NKV\n"
"(query head h reads key/value head h // (NH // NKV)).\n"
"key_mask: int32 (B, Tk) or None; key j is valid where key_mask[b, j] != 0.\n"
"Query i sits at position q_offset + i and attends the valid keys j <= q_offset + i.\n"
"scale defaults to 1 / sqrt(HS). Returns out (B, Tq, NH, HS) and the attention\n"
"probabilities att (B, NH, Tq, Tk). A query with no valid key gets zeros in both.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension, NH not a multiple of NKV, a negative q_offset or a non-finite scale.");

static PyObject *py_attention_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"q", "k", "v", "key_mask", "q_offset", "scale", NULL};
    PyObject *q_obj, *k_obj, *v_obj, *mask_obj = Py_None, *offset_obj = NULL;
    PyObject *scale_obj = Py_None;
    int q_offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OOO:attention_forward", kwlist, &q_obj,
                                     &k_obj, &v_obj, &mask_obj, &offset_obj, &scale_obj)) {
        return NULL;
    }
    if (offset_obj != NULL && parse_int(offset_obj, "q_offset", &q_offset) < 0) {
        return NULL;
    }
    PyArrayObject *q = check_array(q_obj, "q", NPY_FLOAT32, 4, ANY4, 0);
    if (q == NULL || check_dims(q, "q", (const char *[]){"B", "Tq", "NH", "HS"}) < 0) {
        return NULL;
    }
    int B = (int)PyArray_DIM(q, 0), Tq = (int)PyArray_DIM(q, 1);
    int NH = (int)PyArray_DIM(q, 2), HS = (int)PyArray_DIM(q, 3);
    npy_intp k_shape[4] = {B, ANY_DIM, ANY_DIM, HS};
    PyArrayObject *k = check_array(k_obj, "k", NPY_FLOAT32, 4, k_shape, 0);
    if (k == NULL || check_dims(k, "k", (const char *[]){"B", "Tk", "NKV", "HS"}) < 0) {
        return NULL;
    }
    int Tk = (int)PyArray_DIM(k, 1), NKV = (int)PyArray_DIM(k, 2);
    npy_intp v_shape[4] = {B, Tk, NKV, HS};
    PyArrayObject *v = check_array(v_obj, "v", NPY_FLOAT32, 4, v_shape, 0);
    if (v == NULL || check_head_groups(NH, NKV, "q", "k") < 0) {
        return NULL;
    }
    npy_intp mask_shape[2] = {B, Tk};
    int ok;
    PyArrayObject *mask =
        check_optional_array(mask_obj, "key_mask", NPY_INT32, 2, mask_shape, 0, &ok);
    if (!ok) {
        return NULL;
    }
    if (q_offset < 0) {
        PyErr_Format(PyExc_ValueError, "q_offset must be at least 0, got %d", q_offset);
        return NULL;
    }
    float scale;
    if (parse_scale(scale_obj, 1.0 / sqrt((double)HS), &scale) < 0) {
        return NULL;
    }

    npy_intp out_shape[4] = {B, Tq, NH, HS};
    npy_intp att_shape[4] = {B, NH, Tq, Tk};
    PyArrayObject *out = new_float_array(4, out_shape);
    PyArrayObject *att = out ? new_float_array(4, att_shape) : NULL;
    if (att == NULL) {
        Py_XDECREF(out);
        return NULL;
    }
    const int32_t *mask_data = mask != NULL ? I32(mask) : NULL;
    Py_BEGIN_ALLOW_THREADS
    attention_forward(F32(out), F32(att), F32(q), F32(k), F32(v), mask_data, B, Tq, Tk,
                      q_offset, NH, NKV, HS, scale);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", out, att);
}

PyDoc_STRVAR(attention_backward_doc,
"attention_backward(dout, att, q, k, v, scale=None, dq=None, dk=None, dv=None)\n"
"    -> (dq, dk, dv)\n\n"
"Backpropagate through attention_forward in the training case (Tq = Tk = T,\n"
"q_offset = 0), using the probabilities att it returned. A key mask needs no\n"
"argument here: masked keys have probability 0 in att and get no gradient.\n"
"dout, q: float32 (B, T, NH, HS); k, v: float32 (B, T, NKV, HS);\n"
"att: float32 (B, NH, T, T). scale defaults to 1 / sqrt(HS) and must match the\n"
"forward call. Returns dq, dk, dv shaped like q, k, v: fresh zeros unless\n"
"arrays are passed to accumulate into.\n"
"Raises TypeError for a wrong dtype, ValueError for a wrong shape, a zero\n"
"dimension, NH not a multiple of NKV, a non-finite scale, or a gradient array\n"
"that is read-only or shares memory with an input or another gradient.");

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "att", "q", "k", "v", "scale", "dq", "dk", "dv", NULL};
    PyObject *dout_obj, *att_obj, *q_obj, *k_obj, *v_obj, *scale_obj = Py_None;
    PyObject *dq_obj = Py_None, *dk_obj = Py_None, *dv_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|OOOO:attention_backward", kwlist,
                                     &dout_obj, &att_obj, &q_obj, &k_obj, &v_obj, &scale_obj,
                                     &dq_obj, &dk_obj, &dv_obj)) {
        return NULL;
    }
    PyArrayObject *q = check_array(q_obj, "q", NPY_FLOAT32, 4, ANY4, 0);
    if (q == NULL || check_dims(q, "q", (const char *[]){"B", "T", "NH", "HS"}) < 0) {
        return NULL;
    }
    int B = (int)PyArray_DIM(q, 0), T = (int)PyArray_DIM(q, 1);
    int NH = (int)PyArray_DIM(q, 2), HS = (int)PyArray_DIM(q, 3);
    npy_intp k_shape[4] = {B, T, ANY_DIM, HS};
    PyArrayObject *k = check_array(k_obj, "k", NPY_FLOAT32, 4, k_shape, 0);
    if (k == NULL || check_dims(k, "k", (const char *[]){"B", "T", "NKV", "HS"}) < 0) {
        return NULL;
    }
    int NKV = (int)PyArray_DIM(k, 2);
    npy_intp kv_shape[4] = {B, T, NKV, HS};
    npy_intp q_shape[4] = {B, T, NH, HS};
    npy_intp att_shape[4] = {B, NH, T, T};
    PyArrayObject *v = check_array(v_obj, "v", NPY_FLOAT32, 4, kv_shape, 0);
    PyArrayObject *dout = v ? check_array(dout_obj, "dout", NPY_FLOAT32, 4, q_shape, 0) : NULL;
    PyArrayObject *att = dout ? check_array(att_obj, "att", NPY_FLOAT32, 4, att_shape, 0) : NULL;
    if (att == NULL || check_head_groups(NH, NKV, "q", "k") < 0) {
        return NULL;
    }
    float scale;
    if (parse_scale(scale_obj, 1.0 / sqrt((double)HS), &scale) < 0) {
        return NULL;
    }

    PyArrayObject *inputs[] = {dout, att, q, k, v};
    const char *names[] = {"dout", "att", "q", "k", "v"};
    PyArrayObject *dq = NULL, *dk = NULL, *dv = NULL, *scratch = NULL;
    dq = checked_gradient(dq_obj, "dq", 4, q_shape, inputs, names, 5);
    if (dq == NULL) {
        goto fail;
    }
    dk = checked_gradient(dk_obj, "dk", 4, kv_shape, inputs, names, 5);
    if (dk == NULL) {
        goto fail;
    }
    dv = checked_gradient(dv_obj, "dv", 4, kv_shape, inputs, names, 5);
    if (dv == NULL) {
        goto fail;
    }
    if (check_gradients_disjoint(dq, "dq", dk, "dk") < 0 ||
        check_gradients_disjoint(dq, "dq", dv, "dv") < 0 ||
        check_gradients_disjoint(dk, "dk", dv, "dv") < 0) {
        goto fail;
    }
    npy_intp scratch_shape[3] = {B, NH, T};
    scratch = new_float_array(3, scratch_shape);
    if (scratch == NULL) {
        goto fail;
    }

    Py_BEGIN_ALLOW_THREADS
    attention_backward(F32(dq), F32(dk), F32(dv), F32(scratch), F32(dout), F32(att), F32(q),
                       F32(k), F32(v), B, T, NH, NKV, HS, scale);
    Py_END_ALLOW_THREADS
    Py_DECREF(scratch);
    return Py_BuildValue("(NNN)", dq, dk, dv);

fail:
    Py_XDECREF(dq);
    Py_XDECREF(dk);
    Py_XDECREF(dv);
    return NULL;
}

/* ---------------------------------------------------------------------- */
/* Pointwise activations                                                  */
/* ---------------------------------------------------------------------- */

typedef void (*pointwise_forward_fn)(float *, const float *, size_t);
typedef void (*pointwise_backward_fn)(float *, const float *, const float *, size_t);

/* Shared body of the pointwise forward bindings: out = fn(inp), any shape. */
static PyObject *run_pointwise_forward(PyObject *args, PyObject *kwargs, const char *format,
                                       pointwise_forward_fn fn)
{
    static char *kwlist[] = {"inp", NULL};
    PyObject *inp_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist, &inp_obj)) {
        return NULL;
    }
    PyArrayObject *inp = check_any_shape(inp_obj, "inp", 0);
    if (inp == NULL) {
        return NULL;
    }
    PyArrayObject *out = new_float_array(PyArray_NDIM(inp), PyArray_DIMS(inp));
    if (out == NULL) {
        return NULL;
    }
    size_t N = (size_t)PyArray_SIZE(inp);
    Py_BEGIN_ALLOW_THREADS
    fn(F32(out), F32(inp), N);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

/* Shared body of the pointwise backward bindings: dinp += fn'(inp) * dout. */
static PyObject *run_pointwise_backward(PyObject *args, PyObject *kwargs, const char *format,
                                        pointwise_backward_fn fn)
{
    static char *kwlist[] = {"dout", "inp", "dinp", NULL};
    PyObject *dout_obj, *inp_obj, *dinp_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, format, kwlist, &dout_obj, &inp_obj,
                                     &dinp_obj)) {
        return NULL;
    }
    PyArrayObject *dout = check_any_shape(dout_obj, "dout", 0);
    if (dout == NULL) {
        return NULL;
    }
    int ndim = PyArray_NDIM(dout);
    const npy_intp *shape = PyArray_DIMS(dout);
    PyArrayObject *inp = check_array(inp_obj, "inp", NPY_FLOAT32, ndim, shape, 0);
    if (inp == NULL) {
        return NULL;
    }
    PyArrayObject *inputs[] = {dout, inp};
    const char *names[] = {"dout", "inp"};
    PyArrayObject *dinp = checked_gradient(dinp_obj, "dinp", ndim, shape, inputs, names, 2);
    if (dinp == NULL) {
        return NULL;
    }
    size_t N = (size_t)PyArray_SIZE(dout);
    Py_BEGIN_ALLOW_THREADS
    fn(F32(dinp), F32(inp), F32(dout), N);
    Py_END_ALLOW_THREADS
    return (PyObject *)dinp;
}

#define POINTWISE_ERRORS                                                                  \
    "Raises TypeError for a wrong dtype and ValueError for an empty array, mismatched\n" \
    "shapes, or a dinp that is read-only or shares memory with an input."

#define DEFINE_POINTWISE(NAME, FORMULA, DERIVATIVE)                                           \
    PyDoc_STRVAR(NAME##_forward_doc,                                                          \
                 #NAME "_forward(inp) -> out\n\n"                                             \
                 "Apply " FORMULA " elementwise. inp: float32, any shape; out: same shape.\n" \
                 POINTWISE_ERRORS);                                                           \
    static PyObject *py_##NAME##_forward(PyObject *self, PyObject *args, PyObject *kwargs)   \
    {                                                                                         \
        return run_pointwise_forward(args, kwargs, "O:" #NAME "_forward", NAME##_forward);    \
    }                                                                                         \
    PyDoc_STRVAR(NAME##_backward_doc,                                                         \
                 #NAME "_backward(dout, inp, dinp=None) -> dinp\n\n"                          \
                 "Backpropagate: dinp += " DERIVATIVE " * dout, elementwise.\n"               \
                 "dout, inp: float32, same shape; dinp is fresh zeros unless an array is\n"  \
                 "passed to accumulate into.\n" POINTWISE_ERRORS);                           \
    static PyObject *py_##NAME##_backward(PyObject *self, PyObject *args, PyObject *kwargs)  \
    {                                                                                         \
        return run_pointwise_backward(args, kwargs, "OO|O:" #NAME "_backward",               \
                                      NAME##_backward);                                      \
    }

DEFINE_POINTWISE(gelu_tanh, "GELU with the tanh approximation (torch approximate='tanh')",
                 "gelu_tanh'(inp)")
DEFINE_POINTWISE(gelu_exact, "exact GELU, x * Phi(x) via erf", "gelu_exact'(inp)")
DEFINE_POINTWISE(relu, "ReLU, max(x, 0)", "relu'(inp) (0 at inp = 0)")
DEFINE_POINTWISE(silu, "SiLU, x * sigmoid(x)", "silu'(inp)")

PyDoc_STRVAR(swiglu_forward_doc,
"swiglu_forward(gate, up) -> out\n\n"
"Apply the SwiGLU gate: out = silu(gate) * up, elementwise.\n"
"gate, up: float32, same shape (any); out: same shape.\n"
"Raises TypeError for a wrong dtype and ValueError for an empty array or\n"
"mismatched shapes.");

static PyObject *py_swiglu_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"gate", "up", NULL};
    PyObject *gate_obj, *up_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:swiglu_forward", kwlist, &gate_obj,
                                     &up_obj)) {
        return NULL;
    }
    PyArrayObject *gate = check_any_shape(gate_obj, "gate", 0);
    if (gate == NULL) {
        return NULL;
    }
    PyArrayObject *up =
        check_array(up_obj, "up", NPY_FLOAT32, PyArray_NDIM(gate), PyArray_DIMS(gate), 0);
    if (up == NULL) {
        return NULL;
    }
    PyArrayObject *out = new_float_array(PyArray_NDIM(gate), PyArray_DIMS(gate));
    if (out == NULL) {
        return NULL;
    }
    size_t N = (size_t)PyArray_SIZE(gate);
    Py_BEGIN_ALLOW_THREADS
    swiglu_forward(F32(out), F32(gate), F32(up), N);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

PyDoc_STRVAR(swiglu_backward_doc,
"swiglu_backward(dout, gate, up, dgate=None, dup=None) -> (dgate, dup)\n\n"
"Backpropagate through swiglu_forward: dgate += dout * up * silu'(gate),\n"
"dup += dout * silu(gate). dout, gate, up: float32, same shape (any).\n"
"Gradients are fresh zeros unless arrays are passed to accumulate into.\n"
"Raises TypeError for a wrong dtype and ValueError for an empty array,\n"
"mismatched shapes, or a gradient array that is read-only or shares memory with\n"
"an input or the other gradient.");

static PyObject *py_swiglu_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"dout", "gate", "up", "dgate", "dup", NULL};
    PyObject *dout_obj, *gate_obj, *up_obj, *dgate_obj = Py_None, *dup_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OO:swiglu_backward", kwlist, &dout_obj,
                                     &gate_obj, &up_obj, &dgate_obj, &dup_obj)) {
        return NULL;
    }
    PyArrayObject *dout = check_any_shape(dout_obj, "dout", 0);
    if (dout == NULL) {
        return NULL;
    }
    int ndim = PyArray_NDIM(dout);
    const npy_intp *shape = PyArray_DIMS(dout);
    PyArrayObject *gate = check_array(gate_obj, "gate", NPY_FLOAT32, ndim, shape, 0);
    PyArrayObject *up = gate ? check_array(up_obj, "up", NPY_FLOAT32, ndim, shape, 0) : NULL;
    if (up == NULL) {
        return NULL;
    }
    PyArrayObject *inputs[] = {dout, gate, up};
    const char *names[] = {"dout", "gate", "up"};
    PyArrayObject *dgate = checked_gradient(dgate_obj, "dgate", ndim, shape, inputs, names, 3);
    if (dgate == NULL) {
        return NULL;
    }
    PyArrayObject *dup = checked_gradient(dup_obj, "dup", ndim, shape, inputs, names, 3);
    if (dup == NULL || check_gradients_disjoint(dgate, "dgate", dup, "dup") < 0) {
        Py_DECREF(dgate);
        Py_XDECREF(dup);
        return NULL;
    }
    size_t N = (size_t)PyArray_SIZE(dout);
    Py_BEGIN_ALLOW_THREADS
    swiglu_backward(F32(dgate), F32(dup), F32(dout), F32(gate), F32(up), N);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", dgate, dup);
}

/* ---------------------------------------------------------------------- */
/* Cross-entropy and KL divergence                                        */
/* ---------------------------------------------------------------------- */

/* Checks logits (N,V) and weights (N,), which must be finite, as every loss
 * binding takes them. */
static int check_logits_and_weights(PyObject *logits_obj, PyObject *weights_obj,
                                    PyArrayObject **logits, PyArrayObject **weights)
{
    *logits = check_array(logits_obj, "logits", NPY_FLOAT32, 2, ANY2, 0);
    if (*logits == NULL || check_dims(*logits, "logits", (const char *[]){"N", "V"}) < 0) {
        return -1;
    }
    npy_intp n_shape[1] = {PyArray_DIM(*logits, 0)};
    *weights = check_array(weights_obj, "weights", NPY_FLOAT32, 1, n_shape, 0);
    if (*weights == NULL ||
        check_finite_array(F32(*weights), PyArray_SIZE(*weights), "weights") < 0) {
        return -1;
    }
    return 0;
}

/* Checks targets (N,) against logits (N,V): every target of a row with a
 * nonzero weight must lie in [0, V). The check runs on private copies of
 * targets and weights, returned as new references in *target_copy and
 * *weight_copy for the computation to read. Returns the caller's targets
 * (borrowed), or NULL with an exception and no copies. */
static PyArrayObject *check_targets(PyObject *targets_obj, PyArrayObject *logits,
                                    PyArrayObject *weights, PyArrayObject **target_copy,
                                    PyArrayObject **weight_copy)
{
    *target_copy = NULL;
    *weight_copy = NULL;
    npy_intp n_shape[1] = {PyArray_DIM(logits, 0)};
    PyArrayObject *targets = check_array(targets_obj, "targets", NPY_INT32, 1, n_shape, 0);
    if (targets == NULL) {
        return NULL;
    }
    *target_copy = private_copy(targets);
    *weight_copy = *target_copy != NULL ? private_copy(weights) : NULL;
    if (*weight_copy == NULL ||
        check_index_range(I32(*target_copy), F32(*weight_copy), PyArray_SIZE(targets),
                          (int32_t)PyArray_DIM(logits, 1), "targets") < 0) {
        Py_CLEAR(*target_copy);
        Py_CLEAR(*weight_copy);
        return NULL;
    }
    return targets;
}

/* Returns a new reference to the array that receives dlogits: out after
 * checking it, or a new array when out is None. out may be logits itself (the
 * in-place path of ops.h) but must not share memory with any other input. */
static PyArrayObject *dlogits_output(PyObject *out_obj, PyArrayObject *logits,
                                     PyArrayObject *const *others,
                                     const char *const *other_names, int count)
{
    int ndim = PyArray_NDIM(logits);
    if (out_obj == Py_None) {
        return new_float_array(ndim, PyArray_DIMS(logits));
    }
    PyArrayObject *out = check_array(out_obj, "out", NPY_FLOAT32, ndim, PyArray_DIMS(logits), 1);
    if (out == NULL || check_no_overlap(out, "out", others, other_names, count) < 0) {
        return NULL;
    }
    if (out != logits && arrays_overlap(out, logits)) {
        PyErr_SetString(PyExc_ValueError,
                        "out partly overlaps logits; pass logits itself (in place) or a "
                        "separate array");
        return NULL;
    }
    Py_INCREF(out);
    return out;
}

PyDoc_STRVAR(crossentropy_forward_doc,
"crossentropy_forward(logits, targets, weights) -> (loss_sum, losses)\n\n"
"Compute the token cross-entropy -log softmax(logits)[target] of each row.\n"
"logits: float32 (N, V); targets: int32 (N,); weights: float32 (N,), finite.\n"
"losses: float32 (N,), 0 on rows of weight 0, whose target is not read;\n"
"loss_sum: float, the sum of weights * losses.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension, a non-finite weight or a target outside [0, V) on a row of nonzero\n"
"weight.");

static PyObject *py_crossentropy_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"logits", "targets", "weights", NULL};
    PyObject *logits_obj, *targets_obj, *weights_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:crossentropy_forward", kwlist,
                                     &logits_obj, &targets_obj, &weights_obj)) {
        return NULL;
    }
    PyArrayObject *logits, *weights;
    if (check_logits_and_weights(logits_obj, weights_obj, &logits, &weights) < 0) {
        return NULL;
    }
    PyArrayObject *target_copy, *weight_copy;
    if (check_targets(targets_obj, logits, weights, &target_copy, &weight_copy) == NULL) {
        return NULL;
    }
    int N = (int)PyArray_DIM(logits, 0), V = (int)PyArray_DIM(logits, 1);
    npy_intp n_shape[1] = {N};
    PyArrayObject *losses = new_float_array(1, n_shape);
    PyObject *result = NULL;
    if (losses != NULL) {
        double total;
        Py_BEGIN_ALLOW_THREADS
        total = crossentropy_forward(F32(losses), F32(logits), I32(target_copy), F32(weight_copy),
                                     N, V);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(dN)", total, losses);
    }
    Py_DECREF(target_copy);
    Py_DECREF(weight_copy);
    return result;
}

PyDoc_STRVAR(crossentropy_backward_doc,
"crossentropy_backward(logits, targets, weights, scale, out=None) -> dlogits\n\n"
"Compute dlogits = scale * weights[n] * (softmax(logits[n]) - onehot(targets[n])),\n"
"and 0 on rows of weight 0. Shapes as crossentropy_forward; dlogits (N, V).\n"
"dlogits is a new array unless out is given. out may be logits itself, which\n"
"is then overwritten in place; this overwrites, it does not accumulate.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension, a non-finite weight or scale, a target outside [0, V) on a row of\n"
"nonzero weight, or an out that is read-only or overlaps another input.");

static PyObject *py_crossentropy_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"logits", "targets", "weights", "scale", "out", NULL};
    PyObject *logits_obj, *targets_obj, *weights_obj, *scale_obj, *out_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|O:crossentropy_backward", kwlist,
                                     &logits_obj, &targets_obj, &weights_obj, &scale_obj,
                                     &out_obj)) {
        return NULL;
    }
    PyArrayObject *logits, *weights;
    if (check_logits_and_weights(logits_obj, weights_obj, &logits, &weights) < 0) {
        return NULL;
    }
    PyArrayObject *target_copy, *weight_copy;
    PyArrayObject *targets = check_targets(targets_obj, logits, weights, &target_copy,
                                           &weight_copy);
    float scale;
    if (targets == NULL) {
        return NULL;
    }
    if (parse_finite_float(scale_obj, "scale", &scale) < 0) {
        Py_DECREF(target_copy);
        Py_DECREF(weight_copy);
        return NULL;
    }
    PyArrayObject *others[] = {targets, weights};
    const char *other_names[] = {"targets", "weights"};
    PyArrayObject *dlogits = dlogits_output(out_obj, logits, others, other_names, 2);
    if (dlogits != NULL) {
        int N = (int)PyArray_DIM(logits, 0), V = (int)PyArray_DIM(logits, 1);
        Py_BEGIN_ALLOW_THREADS
        crossentropy_backward(F32(dlogits), F32(logits), I32(target_copy), F32(weight_copy),
                              scale, N, V);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(target_copy);
    Py_DECREF(weight_copy);
    return (PyObject *)dlogits;
}

/* Checks ref_logits against the shape of logits. */
static PyArrayObject *check_ref_logits(PyObject *ref_obj, PyArrayObject *logits)
{
    return check_array(ref_obj, "ref_logits", NPY_FLOAT32, 2, PyArray_DIMS(logits), 0);
}

PyDoc_STRVAR(kl_forward_doc,
"kl_forward(logits, ref_logits, weights, reverse=False) -> (loss_sum, losses)\n\n"
"Compute the KL divergence per row between p_ref = softmax(ref_logits) and\n"
"p = softmax(logits): KL(p_ref || p) when reverse is false, KL(p || p_ref)\n"
"when it is true.\n"
"logits, ref_logits: float32 (N, V); weights: float32 (N,), finite.\n"
"losses: float32 (N,), 0 on rows of weight 0; loss_sum: float, the sum of\n"
"weights * losses.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension or a non-finite weight.");

static PyObject *py_kl_forward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"logits", "ref_logits", "weights", "reverse", NULL};
    PyObject *logits_obj, *ref_obj, *weights_obj;
    int reverse = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|p:kl_forward", kwlist, &logits_obj,
                                     &ref_obj, &weights_obj, &reverse)) {
        return NULL;
    }
    PyArrayObject *logits, *weights;
    if (check_logits_and_weights(logits_obj, weights_obj, &logits, &weights) < 0) {
        return NULL;
    }
    PyArrayObject *ref = check_ref_logits(ref_obj, logits);
    if (ref == NULL) {
        return NULL;
    }
    int N = (int)PyArray_DIM(logits, 0), V = (int)PyArray_DIM(logits, 1);
    npy_intp n_shape[1] = {N};
    PyArrayObject *losses = new_float_array(1, n_shape);
    if (losses == NULL) {
        return NULL;
    }
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = kl_forward(F32(losses), F32(logits), F32(ref), F32(weights), N, V, reverse);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dN)", total, losses);
}

PyDoc_STRVAR(kl_backward_doc,
"kl_backward(logits, ref_logits, weights, scale, reverse=False, out=None) -> dlogits\n\n"
"Compute the gradient of kl_forward's losses with respect to logits, scaled by\n"
"scale * weights[n]: (p - p_ref) when reverse is false, and\n"
"p * (log p - log p_ref - KL(p || p_ref)) when it is true; 0 on rows of weight 0.\n"
"Shapes as kl_forward; dlogits (N, V) is a new array unless out is given. out\n"
"may be logits itself, which is then overwritten in place.\n"
"Raises TypeError for a wrong dtype and ValueError for a wrong shape, a zero\n"
"dimension, a non-finite weight or scale, or an out that is read-only or\n"
"overlaps another input.");

static PyObject *py_kl_backward(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"logits", "ref_logits", "weights", "scale", "reverse", "out", NULL};
    PyObject *logits_obj, *ref_obj, *weights_obj, *scale_obj, *out_obj = Py_None;
    int reverse = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|pO:kl_backward", kwlist, &logits_obj,
                                     &ref_obj, &weights_obj, &scale_obj, &reverse, &out_obj)) {
        return NULL;
    }
    PyArrayObject *logits, *weights;
    if (check_logits_and_weights(logits_obj, weights_obj, &logits, &weights) < 0) {
        return NULL;
    }
    PyArrayObject *ref = check_ref_logits(ref_obj, logits);
    float scale;
    if (ref == NULL || parse_finite_float(scale_obj, "scale", &scale) < 0) {
        return NULL;
    }
    PyArrayObject *others[] = {ref, weights};
    const char *other_names[] = {"ref_logits", "weights"};
    PyArrayObject *dlogits = dlogits_output(out_obj, logits, others, other_names, 2);
    if (dlogits == NULL) {
        return NULL;
    }
    int N = (int)PyArray_DIM(logits, 0), V = (int)PyArray_DIM(logits, 1);
    Py_BEGIN_ALLOW_THREADS
    kl_backward(F32(dlogits), F32(logits), F32(ref), F32(weights), scale, N, V, reverse);
    Py_END_ALLOW_THREADS
    return (PyObject *)dlogits;
}

/* ---------------------------------------------------------------------- */
/* Optimizer and vector arithmetic                                        */
/* ---------------------------------------------------------------------- */

PyDoc_STRVAR(adamw_update_doc,
"adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step) -> None\n\n"
"Apply one AdamW step in place, as torch.optim.AdamW computes it (decoupled\n"
"weight decay, bias correction). param, grad, m, v: float32, one shape (any);\n"
"param, m and v are updated in place. step is the 1-based step count.\n"
"Raises TypeError for a wrong dtype, ValueError for mismatched shapes, an empty\n"
"or read-only param, m or v, arrays that share memory, a non-finite\n"
"hyperparameter, lr < 0, weight_decay < 0, a beta outside [0, 1), eps <= 0 or\n"
"step < 1.");

static PyObject *py_adamw_update(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"param", "grad", "m", "v", "lr", "beta1", "beta2", "eps",
                             "weight_decay", "step", NULL};
    PyObject *param_obj, *grad_obj, *m_obj, *v_obj;
    PyObject *lr_obj, *beta1_obj, *beta2_obj, *eps_obj, *wd_obj, *step_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO:adamw_update", kwlist,
                                     &param_obj, &grad_obj, &m_obj, &v_obj, &lr_obj,
                                     &beta1_obj, &beta2_obj, &eps_obj, &wd_obj, &step_obj)) {
        return NULL;
    }
    PyArrayObject *param = check_any_shape(param_obj, "param", 1);
    if (param == NULL) {
        return NULL;
    }
    int ndim = PyArray_NDIM(param);
    const npy_intp *shape = PyArray_DIMS(param);
    PyArrayObject *grad = check_array(grad_obj, "grad", NPY_FLOAT32, ndim, shape, 0);
    PyArrayObject *m = grad ? check_array(m_obj, "m", NPY_FLOAT32, ndim, shape, 1) : NULL;
    PyArrayObject *v = m ? check_array(v_obj, "v", NPY_FLOAT32, ndim, shape, 1) : NULL;
    if (v == NULL) {
        return NULL;
    }
    PyArrayObject *arrays[] = {param, grad, m, v};
    const char *names[] = {"param", "grad", "m", "v"};
    for (int i = 0; i < 4; i++) {
        for (int j = i + 1; j < 4; j++) {
            if (arrays_overlap(arrays[i], arrays[j])) {
                PyErr_Format(PyExc_ValueError,
                             "%s and %s share memory; adamw_update needs four separate arrays",
                             names[i], names[j]);
                return NULL;
            }
        }
    }

    double lr_arg, beta1_arg, beta2_arg, wd_arg;
    float lr, beta1, beta2, eps, weight_decay;
    int step;
    if (parse_real(lr_obj, "lr", &lr_arg) < 0 || to_finite_float(lr_arg, "lr", &lr) < 0 ||
        parse_real(beta1_obj, "beta1", &beta1_arg) < 0 ||
        to_finite_float(beta1_arg, "beta1", &beta1) < 0 ||
        parse_real(beta2_obj, "beta2", &beta2_arg) < 0 ||
        to_finite_float(beta2_arg, "beta2", &beta2) < 0 || parse_eps(eps_obj, &eps) < 0 ||
        parse_real(wd_obj, "weight_decay", &wd_arg) < 0 ||
        to_finite_float(wd_arg, "weight_decay", &weight_decay) < 0 ||
        parse_int(step_obj, "step", &step) < 0) {
        return NULL;
    }
    if (lr < 0.0f) {
        raise_bad_scalar("lr", "be at least 0", lr_arg);
        return NULL;
    }
    if (weight_decay < 0.0f) {
        raise_bad_scalar("weight_decay", "be at least 0", wd_arg);
        return NULL;
    }
    // Checked after the cast, so a beta just below 1 that rounds to 1.0f is rejected too.
    if (!(beta1 >= 0.0f && beta1 < 1.0f)) {
        raise_bad_scalar("beta1", "lie in [0, 1) as a float32", beta1_arg);
        return NULL;
    }
    if (!(beta2 >= 0.0f && beta2 < 1.0f)) {
        raise_bad_scalar("beta2", "lie in [0, 1) as a float32", beta2_arg);
        return NULL;
    }
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "step must be at least 1 (it is 1-based), got %d", step);
        return NULL;
    }

    size_t n = (size_t)PyArray_SIZE(param);
    Py_BEGIN_ALLOW_THREADS
    adamw_update(F32(param), F32(grad), F32(m), F32(v), n, lr_arg, beta1_arg, beta2_arg, eps, wd_arg,
                 step);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sum_squares_doc,
"sum_squares(x) -> float\n\n"
"Return the sum of x**2 over every element, accumulated in double in a fixed\n"
"order that does not depend on the thread count. x: float32, any shape.\n"
"Raises TypeError for a wrong dtype and ValueError for an empty array.");

static PyObject *py_sum_squares(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", NULL};
    PyObject *x_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:sum_squares", kwlist, &x_obj)) {
        return NULL;
    }
    PyArrayObject *x = check_any_shape(x_obj, "x", 0);
    if (x == NULL) {
        return NULL;
    }
    size_t n = (size_t)PyArray_SIZE(x);
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = sum_squares(F32(x), n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(total);
}

PyDoc_STRVAR(scale_inplace_doc,
"scale_inplace(x, s) -> None\n\n"
"Multiply x by s in place. x: float32, any shape, writable; s: finite float.\n"
"Raises TypeError for a wrong dtype and ValueError for an empty or read-only x\n"
"or a non-finite s.");

static PyObject *py_scale_inplace(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "s", NULL};
    PyObject *x_obj, *s_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:scale_inplace", kwlist, &x_obj, &s_obj)) {
        return NULL;
    }
    PyArrayObject *x = check_any_shape(x_obj, "x", 1);
    float s;
    if (x == NULL || parse_finite_float(s_obj, "s", &s) < 0) {
        return NULL;
    }
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS
    scale_inplace(F32(x), n, s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(axpby_doc,
"axpby(out, x, y, a, b) -> None\n\n"
"Write out = a * x + b * y elementwise, in place: the task-vector arithmetic of\n"
"knowledge negation. out, x, y: float32, one shape (any); out is writable and\n"
"may be x or y itself. a, b: finite floats.\n"
"Raises TypeError for a wrong dtype and ValueError for mismatched shapes, an\n"
"empty or read-only out, an out that partly overlaps x or y, or a non-finite\n"
"a or b.");

static PyObject *py_axpby(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "x", "y", "a", "b", NULL};
    PyObject *out_obj, *x_obj, *y_obj, *a_obj, *b_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO:axpby", kwlist, &out_obj, &x_obj,
                                     &y_obj, &a_obj, &b_obj)) {
        return NULL;
    }
    PyArrayObject *out = check_any_shape(out_obj, "out", 1);
    if (out == NULL) {
        return NULL;
    }
    int ndim = PyArray_NDIM(out);
    const npy_intp *shape = PyArray_DIMS(out);
    PyArrayObject *x = check_array(x_obj, "x", NPY_FLOAT32, ndim, shape, 0);
    PyArrayObject *y = x ? check_array(y_obj, "y", NPY_FLOAT32, ndim, shape, 0) : NULL;
    if (y == NULL) {
        return NULL;
    }
    // out may be exactly x or y (same data, element i read before it is
    // written), but a shifted overlap would read elements already written.
    PyArrayObject *inputs[] = {x, y};
    const char *names[] = {"x", "y"};
    for (int i = 0; i < 2; i++) {
        if (PyArray_BYTES(inputs[i]) != PyArray_BYTES(out) && arrays_overlap(out, inputs[i])) {
            PyErr_Format(PyExc_ValueError,
                         "out partly overlaps %s; pass %s itself or a separate array", names[i],
                         names[i]);
            return NULL;
        }
    }
    float a, b;
    if (parse_finite_float(a_obj, "a", &a) < 0 || parse_finite_float(b_obj, "b", &b) < 0) {
        return NULL;
    }
    size_t n = (size_t)PyArray_SIZE(out);
    Py_BEGIN_ALLOW_THREADS
    axpby(F32(out), F32(x), F32(y), a, b, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------- */
/* Method table, registered into skupy._core by module.c                  */
/* ---------------------------------------------------------------------- */

#define OP_METHOD(NAME) \
    {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_VARARGS | METH_KEYWORDS, NAME##_doc}

PyMethodDef skupy_ops_methods[] = {
    OP_METHOD(embedding_forward),
    OP_METHOD(embedding_backward),
    OP_METHOD(linear_forward),
    OP_METHOD(linear_backward),
    OP_METHOD(layernorm_forward),
    OP_METHOD(layernorm_backward),
    OP_METHOD(rmsnorm_forward),
    OP_METHOD(rmsnorm_backward),
    OP_METHOD(rope_forward),
    OP_METHOD(rope_backward),
    OP_METHOD(attention_forward),
    OP_METHOD(attention_backward),
    OP_METHOD(gelu_tanh_forward),
    OP_METHOD(gelu_tanh_backward),
    OP_METHOD(gelu_exact_forward),
    OP_METHOD(gelu_exact_backward),
    OP_METHOD(relu_forward),
    OP_METHOD(relu_backward),
    OP_METHOD(silu_forward),
    OP_METHOD(silu_backward),
    OP_METHOD(swiglu_forward),
    OP_METHOD(swiglu_backward),
    OP_METHOD(crossentropy_forward),
    OP_METHOD(crossentropy_backward),
    OP_METHOD(kl_forward),
    OP_METHOD(kl_backward),
    OP_METHOD(adamw_update),
    OP_METHOD(sum_squares),
    OP_METHOD(scale_inplace),
    OP_METHOD(axpby),
    {NULL, NULL, 0, NULL},
};
