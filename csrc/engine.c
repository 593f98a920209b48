/*
 * engine.c: the Python type skupy._core.Engine around model.c.
 *
 * An Engine owns the activation buffers of one model; parameters and
 * gradients stay NumPy arrays owned by Python and are passed to every call as
 * lists in the order param_specs() returns. The wrappers here validate and
 * convert; the numerics live in model.c and ops.c.
 *
 * Call sequence for training:
 *   forward(params, tokens, positions, mask)    logits (B,T,V) kept inside
 *   cross_entropy(targets, weights, grad_scale) or kl_div(...): loss, and
 *                                               dlogits written over logits
 *   backward(params, grads)                     gradients accumulate
 * An Engine is not shared between threads: a call made while another thread
 * is inside the same Engine raises RuntimeError.
 */
#include "check.h"

#include <math.h>
#include <string.h>

#include "generate.h"
#include "model.h"
#include "ops.h"

enum { STATE_EMPTY = 0, STATE_LOGITS = 1, STATE_DLOGITS = 2 };

typedef struct {
    PyObject_HEAD
    Model model;
    int ready;       /* model_init succeeded */
    int busy;        /* a method call is in progress; see engine_claim */
    int state;       /* STATE_* */
    int num_specs;
    ParamSpec *specs;
    /* Scratch for private copies of the caller's index and weight arrays. The
     * C code checks the copies and reads them with the GIL released, so a
     * thread that changes the caller's arrays meanwhile cannot undo a check. */
    void *scratch;
    size_t scratch_bytes;
} EngineObject;

/* ------------------------------------------------------------------------ */
/* Config parsing */

static int dict_int(PyObject *d, const char *key, int fallback, int *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (v == NULL || v == Py_None) {
        *out = fallback;
        return 0;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "config[%s] must be an integer", key);
        return -1;
    }
    if (x < -1 || x > 1L << 30) {
        PyErr_Format(PyExc_ValueError, "config[%s] = %ld is out of range", key, x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int dict_float(PyObject *d, const char *key, float fallback, float *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (v == NULL || v == Py_None) {
        *out = fallback;
        return 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "config[%s] must be a number", key);
        return -1;
    }
    if (!isfinite(x)) {
        PyErr_Format(PyExc_ValueError, "config[%s] must be finite", key);
        return -1;
    }
    *out = (float)x;
    return 0;
}

/* Maps a string entry to an index in names; missing uses fallback. */
static int dict_choice(PyObject *d, const char *key, const char *const *names, int count,
                       int fallback, int *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (v == NULL || v == Py_None) {
        *out = fallback;
        return 0;
    }
    const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    for (int i = 0; s != NULL && i < count; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "config[%s] = %R is not one of the supported values", key, v);
    return -1;
}

static int parse_config(PyObject *d, ModelConfig *c)
{
    static const char *const norms[] = {"rmsnorm", "layernorm"};
    static const char *const acts[] = {"swiglu", "gelu_tanh", "gelu", "relu"};
    static const char *const positions[] = {"learned", "rope"};
    static const char *const targets[NUM_LINEAR] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};
    memset(c, 0, sizeof *c);
    if (dict_int(d, "vocab_size", 0, &c->V) || dict_int(d, "hidden_size", 0, &c->C) ||
        dict_int(d, "embed_dim", c->C, &c->E) || dict_int(d, "num_layers", 0, &c->L) ||
        dict_int(d, "num_heads", 0, &c->NH) || dict_int(d, "num_kv_heads", c->NH, &c->NKV) ||
        dict_int(d, "head_dim", c->NH > 0 ? c->C / c->NH : 0, &c->HS) ||
        dict_int(d, "intermediate_size", 0, &c->F) ||
        dict_int(d, "max_position_embeddings", 0, &c->max_positions) ||
        dict_int(d, "position_offset", 0, &c->position_offset) ||
        dict_choice(d, "norm", norms, 2, NORM_RMS, &c->norm) ||
        dict_choice(d, "activation", acts, 4, ACT_SWIGLU, &c->act) ||
        dict_choice(d, "position", positions, 2, 1, &c->rope) ||
        dict_int(d, "rope_interleaved", 0, &c->rope_interleaved) ||
        dict_int(d, "tie_word_embeddings", 0, &c->tied) ||
        dict_int(d, "attention_bias", 0, &c->attn_bias) ||
        dict_int(d, "attention_out_bias", 0, &c->attn_out_bias) ||
        dict_int(d, "mlp_bias", 0, &c->mlp_bias) || dict_int(d, "pre_norm", 1, &c->pre_norm) ||
        dict_int(d, "final_norm", 1, &c->final_norm) ||
        dict_float(d, "norm_eps", 1e-5f, &c->norm_eps) ||
        dict_int(d, "lora_rank", 0, &c->lora_rank) ||
        dict_float(d, "lora_scale", 1.0f, &c->lora_scale) ||
        dict_int(d, "recompute", 0, &c->recompute)) {
        return -1;
    }
    PyObject *lt = PyDict_GetItemString(d, "lora_targets");
    if (lt != NULL && lt != Py_None) {
        PyObject *seq = PySequence_Fast(lt, "config[lora_targets] must be a list of names");
        if (seq == NULL) {
            return -1;
        }
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            const char *s = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
            int found = -1;
            for (int k = 0; s != NULL && k < NUM_LINEAR; k++) {
                if (strcmp(s, targets[k]) == 0) {
                    found = k;
                }
            }
            if (found < 0) {
                PyErr_Format(PyExc_ValueError,
                             "config[lora_targets] entry %R is not a linear layer name "
                             "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                             item);
                Py_DECREF(seq);
                return -1;
            }
            c->lora_targets |= 1 << found;
        }
        Py_DECREF(seq);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Type basics */

static int engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", NULL};
    PyObject *config;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PyDict_Type, &config)) {
        return -1;
    }
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialized");
        return -1;
    }
    ModelConfig cfg;
    if (parse_config(config, &cfg) < 0) {
        return -1;
    }
    char err[256];
    if (model_init(&self->model, &cfg, err, sizeof err) < 0) {
        PyErr_Format(PyExc_ValueError, "invalid model config: %s", err);
        return -1;
    }
    self->specs = PyMem_Calloc((size_t)model_max_slots(&cfg), sizeof(ParamSpec));
    if (self->specs == NULL) {
        model_free(&self->model);
        PyErr_NoMemory();
        return -1;
    }
    self->num_specs = model_param_specs(&cfg, self->specs);
    self->ready = 1;
    return 0;
}

static void engine_dealloc(EngineObject *self)
{
    if (self->ready) {
        model_free(&self->model);
    }
    PyMem_Free(self->specs);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Common entry check: initialized. Every method that reads or writes the
 * model's buffers is also wrapped by CLAIMED_* below, which claims the engine. */
static int engine_enter(EngineObject *self)
{
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialized; call Engine(config)");
        return -1;
    }
    return 0;
}

/* Marks the engine busy for a whole method call, or raises RuntimeError when
 * another call is in progress. The flag is tested and set under the GIL with
 * no Python code in between. It stays set while the method runs Python code
 * (argument conversion, iteration over the params list) or releases the GIL,
 * so no second thread can enter between the check and the work. */
static int engine_claim(EngineObject *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Engine is in use by another thread; create one model per thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static PyObject *engine_param_specs(EngineObject *self, PyObject *noargs)
{
    if (engine_enter(self) < 0) {
        return NULL;
    }
    PyObject *list = PyList_New(self->num_specs);
    if (list == NULL) {
        return NULL;
    }
    for (int i = 0; i < self->num_specs; i++) {
        ParamSpec *s = &self->specs[i];
        PyObject *item = s->ndim == 1 ? Py_BuildValue("(s(l))", s->name, s->shape[0])
                                      : Py_BuildValue("(s(ll))", s->name, s->shape[0], s->shape[1]);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

/* Fills slots (num_slots pointers) from a list of arrays in spec order.
 * optional: None entries are allowed and leave the slot NULL (gradients).
 * keep receives a new reference to a tuple that keeps the arrays alive. */
/* Whether slot holds the weight of a block linear layer, the only kind that
 * may be stored in bfloat16. */
static int is_block_linear_weight(int slot)
{
    if (slot < NUM_GLOBAL_SLOTS) {
        return 0;
    }
    int within = (slot - NUM_GLOBAL_SLOTS) % NUM_LAYER_SLOTS;
    return within >= PL_WEIGHT && within < PL_WEIGHT + NUM_LINEAR;
}

/* bf16: NULL for gradients (float32 only); for parameters, receives per slot
 * whether a block linear weight came as a uint16 (bfloat16) array. */
static int collect_arrays(EngineObject *self, PyObject *list, const char *what, int optional,
                          int writable, float **slots, uint8_t *bf16, PyObject **keep)
{
    *keep = NULL;
    PyObject *tuple = PySequence_Tuple(list);
    if (tuple == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of numpy arrays", what);
        return -1;
    }
    if (PyTuple_GET_SIZE(tuple) != self->num_specs) {
        PyErr_Format(PyExc_ValueError, "%s must have %d arrays in param_specs() order, got %zd",
                     what, self->num_specs, PyTuple_GET_SIZE(tuple));
        Py_DECREF(tuple);
        return -1;
    }
    memset(slots, 0, (size_t)self->model.num_slots * sizeof(float *));
    if (bf16 != NULL) {
        memset(bf16, 0, (size_t)self->model.num_slots);
    }
    for (int i = 0; i < self->num_specs; i++) {
        ParamSpec *s = &self->specs[i];
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (item == Py_None && optional) {
            continue;
        }
        char name[96];
        snprintf(name, sizeof name, "%s[%s]", what, s->name);
        npy_intp shape[2] = {s->shape[0], s->shape[1]};
        int typenum = NPY_FLOAT32;
        if (bf16 != NULL && is_block_linear_weight(s->slot) && PyArray_Check(item) &&
            PyArray_TYPE((PyArrayObject *)item) == NPY_UINT16) {
            typenum = NPY_UINT16; /* bfloat16 bits of a frozen weight */
            bf16[s->slot] = 1;
        }
        PyArrayObject *arr = check_array(item, name, typenum, s->ndim, shape, writable);
        if (arr == NULL) {
            Py_DECREF(tuple);
            return -1;
        }
        slots[s->slot] = (float *)PyArray_DATA(arr);
    }
    *keep = tuple;
    return 0;
}

static PyObject *engine_set_inv_freq(EngineObject *self, PyObject *args)
{
    PyObject *obj;
    if (engine_enter(self) < 0 || !PyArg_ParseTuple(args, "O", &obj)) {
        return NULL;
    }
    npy_intp shape[1] = {self->model.cfg.HS / 2};
    PyArrayObject *arr = check_array(obj, "inv_freq", NPY_FLOAT32, 1, shape, 0);
    if (arr == NULL || check_finite_array(F32(arr), shape[0], "inv_freq") < 0) {
        return NULL;
    }
    model_set_inv_freq(&self->model, F32(arr));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* forward, losses, backward */

/* Returns engine-owned scratch of at least bytes bytes (valid until the next
 * call), or NULL with MemoryError. */
static void *engine_scratch(EngineObject *self, size_t bytes)
{
    if (bytes > self->scratch_bytes) {
        void *grown = PyMem_Realloc(self->scratch, bytes);
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->scratch = grown;
        self->scratch_bytes = bytes;
    }
    return self->scratch;
}

/* Checks that head_rows is a 1-D int32 array of 1 to N entries. Returns it
 * (borrowed), or NULL with TypeError or ValueError. */
static PyArrayObject *checked_head_rows(PyObject *obj, npy_intp N)
{
    npy_intp any1[1] = {ANY_DIM};
    PyArrayObject *rows = check_array(obj, "head_rows", NPY_INT32, 1, any1, 0);
    if (rows == NULL) {
        return NULL;
    }
    npy_intp R = PyArray_DIM(rows, 0);
    if (R < 1 || R > N) {
        PyErr_Format(PyExc_ValueError,
                     "head_rows has %zd entries; it needs 1 to B*T = %zd row indices, or pass None "
                     "for logits on every row", (Py_ssize_t)R, (Py_ssize_t)N);
        return NULL;
    }
    return rows;
}

/* Checks that the R head rows r are strictly increasing and lie in [0,N).
 * Returns 0, or -1 with ValueError. */
static int check_head_row_values(const int32_t *r, npy_intp R, npy_intp N)
{
    for (npy_intp i = 0; i < R; i++) {
        if (r[i] < 0 || r[i] >= N || (i > 0 && r[i] <= r[i - 1])) {
            PyErr_Format(PyExc_ValueError,
                         "head_rows[%zd] = %d; head_rows must be strictly increasing row indices "
                         "of the flattened batch, in [0, %zd)", (Py_ssize_t)i, (int)r[i],
                         (Py_ssize_t)N);
            return -1;
        }
    }
    return 0;
}

static PyObject *engine_forward(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"params", "tokens", "positions", "mask", "use_lora", "head_rows",
                             NULL};
    PyObject *params, *tokens_obj, *positions_obj, *mask_obj, *rows_obj = Py_None;
    int use_lora = 1;
    if (engine_enter(self) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|pO", kwlist, &params, &tokens_obj,
                                     &positions_obj, &mask_obj, &use_lora, &rows_obj)) {
        return NULL;
    }
    Model *m = &self->model;
    const ModelConfig *c = &m->cfg;

    npy_intp any2[2] = {ANY_DIM, ANY_DIM};
    PyArrayObject *tokens = check_array(tokens_obj, "tokens", NPY_INT32, 2, any2, 0);
    if (tokens == NULL) {
        return NULL;
    }
    npy_intp B = PyArray_DIM(tokens, 0), T = PyArray_DIM(tokens, 1);
    if (B == 0 || T == 0) {
        PyErr_Format(PyExc_ValueError, "tokens has shape (%zd, %zd); B and T must be at least 1",
                     (Py_ssize_t)B, (Py_ssize_t)T);
        return NULL;
    }
    if (T > c->max_positions) {
        PyErr_Format(PyExc_ValueError,
                     "sequence length T=%zd exceeds max_position_embeddings=%d; truncate the input",
                     (Py_ssize_t)T, c->max_positions);
        return NULL;
    }
    if ((double)B * (double)T > 1e8) {
        PyErr_Format(PyExc_ValueError, "batch of %zd x %zd tokens is too large", (Py_ssize_t)B,
                     (Py_ssize_t)T);
        return NULL;
    }
    npy_intp bt[2] = {B, T};
    PyArrayObject *positions = check_array(positions_obj, "positions", NPY_INT32, 2, bt, 0);
    PyArrayObject *mask = positions ? check_array(mask_obj, "mask", NPY_INT32, 2, bt, 0) : NULL;
    PyArrayObject *head_rows = NULL;
    if (mask == NULL ||
        (rows_obj != Py_None && (head_rows = checked_head_rows(rows_obj, B * T)) == NULL)) {
        return NULL;
    }
    npy_intp N = B * T, R = head_rows != NULL ? PyArray_DIM(head_rows, 0) : 0;
    int32_t *ints = engine_scratch(self, (size_t)(3 * N + R) * sizeof(int32_t));
    if (ints == NULL) {
        return NULL;
    }
    int32_t *tok = ints, *pos = ints + N, *msk = ints + 2 * N, *rows = ints + 3 * N;
    memcpy(tok, I32(tokens), (size_t)N * sizeof(int32_t));
    memcpy(pos, I32(positions), (size_t)N * sizeof(int32_t));
    memcpy(msk, I32(mask), (size_t)N * sizeof(int32_t));
    if (head_rows != NULL) {
        memcpy(rows, I32(head_rows), (size_t)R * sizeof(int32_t));
    }
    if (check_index_range(tok, NULL, N, c->V, "tokens") < 0 ||
        check_index_range(pos, NULL, N, c->max_positions, "positions") < 0 ||
        (head_rows != NULL && check_head_row_values(rows, R, N) < 0)) {
        return NULL;
    }

    float **slots = PyMem_Calloc((size_t)m->num_slots, sizeof(float *));
    if (slots == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *keep;
    if (collect_arrays(self, params, "params", 0, 0, slots, m->slot_bf16, &keep) < 0) {
        PyMem_Free(slots);
        return NULL;
    }
    if (model_reserve(m, (int)B, (int)T) < 0 || model_prepare_bf16(m) < 0) {
        PyMem_Free(slots);
        Py_DECREF(keep);
        PyErr_Format(PyExc_MemoryError,
                     "cannot allocate activations for a batch of %zd x %zd tokens; use a smaller "
                     "batch or recompute=True",
                     (Py_ssize_t)B, (Py_ssize_t)T);
        return NULL;
    }

    Py_BEGIN_ALLOW_THREADS
    model_forward(m, slots, tok, pos, msk, (int)B, (int)T, use_lora,
                  head_rows != NULL ? rows : NULL, (int)R);
    Py_END_ALLOW_THREADS
    self->state = STATE_LOGITS;

    PyMem_Free(slots);
    Py_DECREF(keep);
    Py_RETURN_NONE;
}

static int require_logits(EngineObject *self)
{
    if (self->state != STATE_LOGITS) {
        PyErr_SetString(PyExc_RuntimeError,
                        self->state == STATE_EMPTY
                            ? "no logits: call forward() first"
                            : "logits were overwritten by a loss gradient; call forward() again");
        return -1;
    }
    return 0;
}

static PyObject *engine_logits(EngineObject *self, PyObject *noargs)
{
    if (engine_enter(self) < 0 || require_logits(self) < 0) {
        return NULL;
    }
    Model *m = &self->model;
    int all_rows = m->R == m->B * m->T;
    npy_intp dims[3] = {m->B, m->T, m->cfg.V};
    npy_intp rv[2] = {m->R, m->cfg.V};
    PyObject *out = all_rows ? PyArray_SimpleNew(3, dims, NPY_FLOAT32)
                             : PyArray_SimpleNew(2, rv, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    size_t bytes = (size_t)m->R * m->cfg.V * sizeof(float);
    Py_BEGIN_ALLOW_THREADS
    memcpy(PyArray_DATA((PyArrayObject *)out), m->logits, bytes);
    Py_END_ALLOW_THREADS
    return out;
}

/* Hidden state at the LM head input (B,T,E): final norm and projection applied. */
static PyObject *engine_hidden(EngineObject *self, PyObject *noargs)
{
    if (engine_enter(self) < 0) {
        return NULL;
    }
    if (self->state == STATE_EMPTY) {
        PyErr_SetString(PyExc_RuntimeError, "no hidden states: call forward() first");
        return NULL;
    }
    Model *m = &self->model;
    const ModelConfig *c = &m->cfg;
    npy_intp dims[3] = {m->B, m->T, c->E};
    PyObject *out = PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (out == NULL) {
        return NULL;
    }
    size_t N = (size_t)m->B * m->T;
    const float *src = c->E != c->C ? m->proj
                                     : (c->final_norm ? m->fn : m->resid + (size_t)c->L * N * c->C);
    memcpy(PyArray_DATA((PyArrayObject *)out), src, N * c->E * sizeof(float));
    return out;
}

/* Checks that weights is a (B,T) float32 array and copies it into the engine's
 * scratch, followed by extra_bytes for the caller. Returns the copy after
 * checking that it is finite, or NULL with an exception. */
static float *checked_weights(EngineObject *self, PyObject *obj, size_t extra_bytes)
{
    npy_intp bt[2] = {self->model.B, self->model.T};
    PyArrayObject *w = check_array(obj, "weights", NPY_FLOAT32, 2, bt, 0);
    if (w == NULL) {
        return NULL;
    }
    size_t n = (size_t)bt[0] * (size_t)bt[1];
    float *copy = engine_scratch(self, n * sizeof(float) + extra_bytes);
    if (copy == NULL) {
        return NULL;
    }
    memcpy(copy, F32(w), n * sizeof(float));
    if (check_finite_array(copy, (npy_intp)n, "weights") < 0) {
        return NULL;
    }
    return copy;
}

/* Parses grad_scale: None (no gradient) or a finite float. */
static int parse_grad_scale(PyObject *obj, int *want, float *scale)
{
    *want = obj != NULL && obj != Py_None;
    if (!*want) {
        return 0;
    }
    double s = PyFloat_AsDouble(obj);
    if (s == -1.0 && PyErr_Occurred()) {
        return -1;
    }
    if (check_finite_scalar(s, "grad_scale") < 0) {
        return -1;
    }
    *scale = (float)s;
    return 0;
}

/* Per-row loss inputs gathered to the R head rows of the last forward. */
typedef struct {
    float *weights;    /* (R), NULL when every row has logits */
    int32_t *targets;  /* (R), NULL when every row has logits or there are no targets */
    float *losses;     /* (R) per-row losses before they are scattered back */
} HeadRows;

/* Gathers the (B,T) weights and targets (targets may be NULL) of the head rows
 * into h, in PyMem buffers that head_rows_scatter frees. With every row in the
 * head, h's pointers stay NULL. Returns 0, or -1 with ValueError when a row
 * outside the head rows has a nonzero weight (MemoryError when out of memory). */
static int head_rows_gather(Model *m, const float *weights, const int32_t *targets, HeadRows *h)
{
    h->weights = NULL;
    h->targets = NULL;
    h->losses = NULL;
    int N = m->B * m->T;
    if (m->R == N) {
        return 0;
    }
    int next = 0;
    for (int n = 0; n < N; n++) {
        if (next < m->R && m->head_rows[next] == n) {
            next++;
        } else if (weights[n] != 0.0f) {
            char value[32];
            snprintf(value, sizeof value, "%g", (double)weights[n]);
            PyErr_Format(PyExc_ValueError,
                         "weights[%d, %d] is %s, but forward() computed logits only for "
                         "head_rows, which leave out that row; include every row with a nonzero "
                         "weight in head_rows", n / m->T, n % m->T, value);
            return -1;
        }
    }
    h->weights = PyMem_Malloc((size_t)m->R * (2 * sizeof(float) + sizeof(int32_t)));
    if (h->weights == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    h->losses = h->weights + m->R;
    if (targets != NULL) {
        h->targets = (int32_t *)(h->losses + m->R);
    }
    for (int r = 0; r < m->R; r++) {
        h->weights[r] = weights[m->head_rows[r]];
        h->losses[r] = 0.0f;
        if (targets != NULL) {
            h->targets[r] = targets[m->head_rows[r]];
        }
    }
    return 0;
}

/* Writes the gathered per-row losses into losses (B,T) and frees h's buffers. */
static void head_rows_scatter(Model *m, HeadRows *h, float *losses)
{
    if (h->weights == NULL) {
        return;
    }
    for (int r = 0; r < m->R; r++) {
        losses[m->head_rows[r]] = h->losses[r];
    }
    PyMem_Free(h->weights);
    h->weights = NULL;
}

static PyObject *engine_cross_entropy(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"targets", "weights", "grad_scale", NULL};
    PyObject *targets_obj, *weights_obj, *scale_obj = NULL;
    if (engine_enter(self) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OO|O", kwlist, &targets_obj, &weights_obj,
                                     &scale_obj) ||
        require_logits(self) < 0) {
        return NULL;
    }
    Model *m = &self->model;
    int N = m->B * m->T, V = m->cfg.V;
    npy_intp bt[2] = {m->B, m->T};
    PyArrayObject *targets = check_array(targets_obj, "targets", NPY_INT32, 2, bt, 0);
    float *weights = targets ? checked_weights(self, weights_obj, (size_t)N * sizeof(int32_t))
                             : NULL;
    if (weights == NULL) {
        return NULL;
    }
    int32_t *target_copy = (int32_t *)(weights + N);
    memcpy(target_copy, I32(targets), (size_t)N * sizeof(int32_t));
    int want_grad;
    float scale = 1.0f;
    if (check_index_range(target_copy, weights, N, V, "targets") < 0 ||
        parse_grad_scale(scale_obj, &want_grad, &scale) < 0) {
        return NULL;
    }
    HeadRows h;
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(2, bt, NPY_FLOAT32, 0);
    if (losses == NULL) {
        return NULL;
    }
    if (head_rows_gather(m, weights, target_copy, &h) < 0) {
        Py_DECREF(losses);
        return NULL;
    }
    const float *w = h.weights != NULL ? h.weights : weights;
    const int32_t *t = h.targets != NULL ? h.targets : target_copy;
    float *l = h.losses != NULL ? h.losses : F32(losses);
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = crossentropy_forward(l, m->logits, t, w, m->R, V);
    if (want_grad) {
        crossentropy_backward(m->logits, m->logits, t, w, scale, m->R, V);
    }
    Py_END_ALLOW_THREADS
    head_rows_scatter(m, &h, F32(losses));
    if (want_grad) {
        self->state = STATE_DLOGITS;
    }
    return Py_BuildValue("(dN)", total, losses);
}

static PyObject *engine_kl_div(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ref_logits", "weights", "reverse", "grad_scale", NULL};
    PyObject *ref_obj, *weights_obj, *scale_obj = NULL;
    int reverse = 0;
    if (engine_enter(self) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OO|pO", kwlist, &ref_obj, &weights_obj,
                                     &reverse, &scale_obj) ||
        require_logits(self) < 0) {
        return NULL;
    }
    Model *m = &self->model;
    int N = m->B * m->T, V = m->cfg.V;
    npy_intp btv[3] = {m->B, m->T, V};
    npy_intp rv[2] = {m->R, V};
    npy_intp bt[2] = {m->B, m->T};
    PyArrayObject *ref = m->R == N ? check_array(ref_obj, "ref_logits", NPY_FLOAT32, 3, btv, 0)
                                   : check_array(ref_obj, "ref_logits", NPY_FLOAT32, 2, rv, 0);
    float *weights = ref ? checked_weights(self, weights_obj, 0) : NULL;
    int want_grad;
    float scale = 1.0f;
    if (weights == NULL || parse_grad_scale(scale_obj, &want_grad, &scale) < 0) {
        return NULL;
    }
    HeadRows h;
    PyArrayObject *losses = (PyArrayObject *)PyArray_ZEROS(2, bt, NPY_FLOAT32, 0);
    if (losses == NULL) {
        return NULL;
    }
    if (head_rows_gather(m, weights, NULL, &h) < 0) {
        Py_DECREF(losses);
        return NULL;
    }
    const float *w = h.weights != NULL ? h.weights : weights;
    float *l = h.losses != NULL ? h.losses : F32(losses);
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = kl_forward(l, m->logits, F32(ref), w, m->R, V, reverse);
    if (want_grad) {
        kl_backward(m->logits, m->logits, F32(ref), w, scale, m->R, V, reverse);
    }
    Py_END_ALLOW_THREADS
    head_rows_scatter(m, &h, F32(losses));
    if (want_grad) {
        self->state = STATE_DLOGITS;
    }
    return Py_BuildValue("(dN)", total, losses);
}

static PyObject *engine_backward(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"params", "grads", NULL};
    PyObject *params, *grads;
    if (engine_enter(self) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &params, &grads)) {
        return NULL;
    }
    if (self->state != STATE_DLOGITS) {
        PyErr_SetString(PyExc_RuntimeError,
                        "no loss gradient: call forward() and then cross_entropy() or kl_div() "
                        "with grad_scale before backward()");
        return NULL;
    }
    Model *m = &self->model;
    float **slots = PyMem_Calloc(2 * (size_t)m->num_slots, sizeof(float *));
    if (slots == NULL) {
        return PyErr_NoMemory();
    }
    float **gslots = slots + m->num_slots;
    PyObject *keep_p, *keep_g;
    if (collect_arrays(self, params, "params", 0, 0, slots, m->slot_bf16, &keep_p) < 0) {
        PyMem_Free(slots);
        return NULL;
    }
    if (collect_arrays(self, grads, "grads", 1, 1, gslots, NULL, &keep_g) < 0) {
        Py_DECREF(keep_p);
        PyMem_Free(slots);
        return NULL;
    }
    for (int i = 0; i < m->num_slots; i++) {
        if (gslots[i] != NULL && m->slot_bf16[i]) {
            PyErr_SetString(PyExc_ValueError,
                            "a bfloat16 (uint16) weight has a gradient array; bfloat16 storage is "
                            "for frozen weights only, so pass None as its gradient");
            Py_DECREF(keep_p);
            Py_DECREF(keep_g);
            PyMem_Free(slots);
            return NULL;
        }
        if (gslots[i] != NULL && gslots[i] == slots[i]) {
            PyErr_SetString(PyExc_ValueError, "a gradient array is the same as its parameter");
            Py_DECREF(keep_p);
            Py_DECREF(keep_g);
            PyMem_Free(slots);
            return NULL;
        }
    }

    if (model_prepare_bf16(m) < 0) {
        Py_DECREF(keep_p);
        Py_DECREF(keep_g);
        PyMem_Free(slots);
        return PyErr_NoMemory();
    }

    Py_BEGIN_ALLOW_THREADS
    model_backward(m, slots, gslots);
    Py_END_ALLOW_THREADS
    self->state = STATE_EMPTY;

    Py_DECREF(keep_p);
    Py_DECREF(keep_g);
    PyMem_Free(slots);
    Py_RETURN_NONE;
}

static PyObject *engine_generate(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"params", "tokens", "mask", "max_new_tokens", "temperature", "top_k",
                             "top_p", "seed", "stop_ids", "pad_id", "use_lora", NULL};
    PyObject *params, *tokens_obj, *mask_obj, *stop_obj = Py_None;
    int max_new = 0, top_k = 0, pad_id = 0, use_lora = 1;
    double temperature = 0.0, top_p = 1.0;
    unsigned long long seed = 0;
    if (engine_enter(self) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OOOi|didKOip", kwlist, &params, &tokens_obj,
                                     &mask_obj, &max_new, &temperature, &top_k, &top_p, &seed,
                                     &stop_obj, &pad_id, &use_lora)) {
        return NULL;
    }
    Model *m = &self->model;
    const ModelConfig *c = &m->cfg;

    npy_intp any2[2] = {ANY_DIM, ANY_DIM};
    PyArrayObject *tokens = check_array(tokens_obj, "tokens", NPY_INT32, 2, any2, 0);
    if (tokens == NULL) {
        return NULL;
    }
    npy_intp B = PyArray_DIM(tokens, 0), Tp = PyArray_DIM(tokens, 1);
    if (B == 0 || Tp == 0) {
        PyErr_Format(PyExc_ValueError, "tokens has shape (%zd, %zd); B and T must be at least 1",
                     (Py_ssize_t)B, (Py_ssize_t)Tp);
        return NULL;
    }
    if (max_new < 1) {
        PyErr_Format(PyExc_ValueError, "max_new_tokens must be at least 1, got %d", max_new);
        return NULL;
    }
    if (Tp + (npy_intp)max_new > c->max_positions) {
        PyErr_Format(PyExc_ValueError,
                     "prompt length %zd + max_new_tokens %d exceeds max_position_embeddings=%d; "
                     "shorten the prompt or generate fewer tokens",
                     (Py_ssize_t)Tp, max_new, c->max_positions);
        return NULL;
    }
    if (!isfinite(temperature) || temperature < 0.0) {
        PyErr_SetString(PyExc_ValueError, "temperature must be a finite number >= 0 (0 = greedy)");
        return NULL;
    }
    if (!(top_p > 0.0 && top_p <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "top_p must lie in (0, 1]");
        return NULL;
    }
    if (top_k < 0) {
        PyErr_SetString(PyExc_ValueError, "top_k must be >= 0 (0 = no top-k filter)");
        return NULL;
    }
    if (pad_id < 0 || pad_id >= c->V) {
        PyErr_Format(PyExc_ValueError, "pad_id=%d is out of range [0, %d)", pad_id, c->V);
        return NULL;
    }
    npy_intp bt[2] = {B, Tp};
    PyArrayObject *mask = check_array(mask_obj, "mask", NPY_INT32, 2, bt, 0);
    if (mask == NULL) {
        return NULL;
    }
    PyArrayObject *stop = NULL;
    if (stop_obj != Py_None) {
        npy_intp any1[1] = {ANY_DIM};
        if ((stop = check_array(stop_obj, "stop_ids", NPY_INT32, 1, any1, 0)) == NULL) {
            return NULL;
        }
    }
    npy_intp N = B * Tp, num_stop = stop != NULL ? PyArray_DIM(stop, 0) : 0;
    int32_t *ints = engine_scratch(self, (size_t)(2 * N + num_stop) * sizeof(int32_t));
    if (ints == NULL) {
        return NULL;
    }
    int32_t *tok = ints, *msk = ints + N, *stop_copy = ints + 2 * N;
    memcpy(tok, I32(tokens), (size_t)N * sizeof(int32_t));
    memcpy(msk, I32(mask), (size_t)N * sizeof(int32_t));
    if (stop != NULL) {
        memcpy(stop_copy, I32(stop), (size_t)num_stop * sizeof(int32_t));
    }
    if (check_index_range(tok, NULL, N, c->V, "tokens") < 0 ||
        check_index_range(stop_copy, NULL, num_stop, c->V, "stop_ids") < 0) {
        return NULL;
    }
    if ((double)B * (double)(Tp + max_new) > 1e7) {
        PyErr_Format(PyExc_ValueError, "generation batch of %zd x %zd tokens is too large",
                     (Py_ssize_t)B, (Py_ssize_t)(Tp + max_new));
        return NULL;
    }

    float **slots = PyMem_Calloc((size_t)m->num_slots, sizeof(float *));
    if (slots == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *keep;
    if (collect_arrays(self, params, "params", 0, 0, slots, m->slot_bf16, &keep) < 0) {
        PyMem_Free(slots);
        return NULL;
    }
    if (model_prepare_bf16(m) < 0) {
        Py_DECREF(keep);
        PyMem_Free(slots);
        return PyErr_NoMemory();
    }
    npy_intp out_dims[2] = {B, max_new};
    PyArrayObject *out = (PyArrayObject *)PyArray_ZEROS(2, out_dims, NPY_INT32, 0);
    PyArrayObject *lengths = (PyArrayObject *)PyArray_ZEROS(1, &B, NPY_INT32, 0);
    if (out == NULL || lengths == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(lengths);
        Py_DECREF(keep);
        PyMem_Free(slots);
        return NULL;
    }
    GenerateOptions opt = {
        .temperature = (float)temperature, .top_k = top_k, .top_p = (float)top_p,
        .seed = (uint64_t)seed, .stop_ids = stop != NULL ? stop_copy : NULL,
        .num_stop = (int)num_stop, .pad_id = pad_id,
        .use_lora = use_lora && c->lora_rank > 0,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = model_generate(m, slots, tok, msk, (int)B, (int)Tp, max_new, &opt, I32(out),
                        I32(lengths));
    Py_END_ALLOW_THREADS
    Py_DECREF(keep);
    PyMem_Free(slots);
    if (rc < 0) {
        Py_DECREF(out);
        Py_DECREF(lengths);
        PyErr_Format(PyExc_MemoryError,
                     "cannot allocate the key/value cache for %zd prompts of %zd + %d tokens; "
                     "generate in smaller batches",
                     (Py_ssize_t)B, (Py_ssize_t)Tp, max_new);
        return NULL;
    }
    return Py_BuildValue("(NN)", out, lengths);
}

/* ------------------------------------------------------------------------ */
/* Module-level helpers that belong with the model */

/* Whether the data of two C-contiguous arrays share any byte. */
static int bytes_overlap(PyArrayObject *a, PyArrayObject *b)
{
    uintptr_t a0 = (uintptr_t)PyArray_BYTES(a), a1 = a0 + (uintptr_t)PyArray_NBYTES(a);
    uintptr_t b0 = (uintptr_t)PyArray_BYTES(b), b1 = b0 + (uintptr_t)PyArray_NBYTES(b);
    return a0 < b1 && b0 < a1;
}

static PyObject *py_lora_merge(PyObject *self, PyObject *args)
{
    PyObject *w_obj, *a_obj, *b_obj;
    double scale;
    if (!PyArg_ParseTuple(args, "OOOd", &w_obj, &a_obj, &b_obj, &scale) ||
        check_finite_scalar(scale, "scale") < 0) {
        return NULL;
    }
    npy_intp any2[2] = {ANY_DIM, ANY_DIM};
    PyArrayObject *w = check_array(w_obj, "weight", NPY_FLOAT32, 2, any2, 1);
    if (w == NULL) {
        return NULL;
    }
    npy_intp OUT = PyArray_DIM(w, 0), IN = PyArray_DIM(w, 1);
    npy_intp a_shape[2] = {ANY_DIM, IN};
    PyArrayObject *a = check_array(a_obj, "lora_A", NPY_FLOAT32, 2, a_shape, 0);
    if (a == NULL) {
        return NULL;
    }
    npy_intp R = PyArray_DIM(a, 0);
    npy_intp b_shape[2] = {OUT, R};
    PyArrayObject *b = check_array(b_obj, "lora_B", NPY_FLOAT32, 2, b_shape, 0);
    if (b == NULL) {
        return NULL;
    }
    if (OUT == 0 || IN == 0 || R == 0) {
        PyErr_SetString(PyExc_ValueError, "weight, lora_A and lora_B must not be empty");
        return NULL;
    }
    /* sgemm reads lora_A and lora_B while it writes weight, so they must not overlap. */
    if (bytes_overlap(w, a) || bytes_overlap(w, b)) {
        PyErr_SetString(PyExc_ValueError,
                        "weight shares memory with lora_A or lora_B but is written to; pass "
                        "separate arrays");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    lora_merge(F32(w), F32(a), F32(b), (int)OUT, (int)IN, (int)R, (float)scale);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef skupy_engine_methods[] = {
    {"lora_merge", py_lora_merge, METH_VARARGS,
     "lora_merge(weight, lora_A, lora_B, scale)\n\n"
     "weight (OUT,IN) += scale * lora_B (OUT,R) @ lora_A (R,IN), in place."},
    {NULL, NULL, 0, NULL},
};

/* Method wrappers that hold the engine for the whole call (see engine_claim). */
#define CLAIMED_NOKEYWORDS(NAME)                                        \
    static PyObject *NAME##_claimed(EngineObject *self, PyObject *args) \
    {                                                                   \
        if (engine_claim(self) < 0) {                                   \
            return NULL;                                                \
        }                                                               \
        PyObject *result = NAME(self, args);                            \
        self->busy = 0;                                                 \
        return result;                                                  \
    }
#define CLAIMED_KEYWORDS(NAME)                                                          \
    static PyObject *NAME##_claimed(EngineObject *self, PyObject *args, PyObject *kwds) \
    {                                                                                   \
        if (engine_claim(self) < 0) {                                                   \
            return NULL;                                                                \
        }                                                                               \
        PyObject *result = NAME(self, args, kwds);                                      \
        self->busy = 0;                                                                 \
        return result;                                                                  \
    }
CLAIMED_NOKEYWORDS(engine_set_inv_freq)
CLAIMED_NOKEYWORDS(engine_logits)
CLAIMED_NOKEYWORDS(engine_hidden)
CLAIMED_KEYWORDS(engine_forward)
CLAIMED_KEYWORDS(engine_cross_entropy)
CLAIMED_KEYWORDS(engine_kl_div)
CLAIMED_KEYWORDS(engine_generate)
CLAIMED_KEYWORDS(engine_backward)

static PyMethodDef engine_methods[] = {
    {"param_specs", (PyCFunction)engine_param_specs, METH_NOARGS,
     "param_specs() -> list of (name, shape) in the order forward/backward take arrays."},
    {"set_inv_freq", (PyCFunction)engine_set_inv_freq_claimed, METH_VARARGS,
     "set_inv_freq(inv_freq)\n\nSet the RoPE inverse frequencies, float32 (head_dim/2,)."},
    {"forward", (PyCFunction)(void (*)(void))engine_forward_claimed, METH_VARARGS | METH_KEYWORDS,
     "forward(params, tokens, positions, mask, use_lora=True, head_rows=None)\n\n"
     "Run the model on tokens (B,T) int32 with positions (B,T) int32 and key mask (B,T) int32\n"
     "(1 = real token). Keeps logits (B,T,V) and activations for backward. head_rows, an\n"
     "increasing int32 (R,) array of flattened row indices, limits the LM head to those rows:\n"
     "when R < B*T the logits are then (R,V), and loss weights must be zero on every other row."},
    {"logits", (PyCFunction)engine_logits_claimed, METH_NOARGS,
     "logits() -> float32 copy of the last forward's logits: (B,T,V), or (R,V) when head_rows\n"
     "left out some rows."},
    {"hidden", (PyCFunction)engine_hidden_claimed, METH_NOARGS,
     "hidden() -> (B,T,E) float32 copy of the LM head's input from the last forward."},
    {"cross_entropy", (PyCFunction)(void (*)(void))engine_cross_entropy_claimed,
     METH_VARARGS | METH_KEYWORDS,
     "cross_entropy(targets, weights, grad_scale=None) -> (weighted_sum, losses)\n\n"
     "Token cross-entropy of the last logits; targets (B,T) int32, weights (B,T) float32.\n"
     "With grad_scale, writes grad_scale * d(weighted_sum)/dlogits over the logits."},
    {"kl_div", (PyCFunction)(void (*)(void))engine_kl_div_claimed, METH_VARARGS | METH_KEYWORDS,
     "kl_div(ref_logits, weights, reverse=False, grad_scale=None) -> (weighted_sum, losses)\n\n"
     "KL(p_ref || p) per position (reverse: KL(p || p_ref)), p from the last logits.\n"
     "ref_logits has the shape logits() returns: (B,T,V), or (R,V) after head_rows that left\n"
     "out some rows."},
    {"generate", (PyCFunction)(void (*)(void))engine_generate_claimed, METH_VARARGS | METH_KEYWORDS,
     "generate(params, tokens, mask, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,\n"
     "         seed=0, stop_ids=None, pad_id=0, use_lora=True) -> (new_tokens, lengths)\n\n"
     "Decode with a key/value cache from left-padded prompts tokens (B,Tp) int32 and mask\n"
     "(B,Tp) int32; returns new_tokens (B,max_new_tokens) and lengths (B,) int32."},
    {"backward", (PyCFunction)(void (*)(void))engine_backward_claimed, METH_VARARGS | METH_KEYWORDS,
     "backward(params, grads)\n\nAccumulate parameter gradients into grads (None = frozen)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject SkupyEngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "skupy._core.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(config: dict): activation buffers and passes of one transformer model.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engine_init,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};
