/*
 * module.c: the skupy._core extension module.
 *
 * It gathers the op bindings (ops_module.c), the Engine type (engine.c) and
 * the thread-count controls into one module, and imports the NumPy C API once
 * for every translation unit (see check.h).
 */
#define SKUPY_MODULE_MAIN
#include "check.h"

#include <omp.h>

#include "blas.h"

extern PyMethodDef skupy_ops_methods[];
extern PyTypeObject SkupyEngineType;
extern PyMethodDef skupy_engine_methods[];

/* Upper bound for set_num_threads. libgomp allocates the state of a whole team
 * when a parallel loop starts and aborts the process when that or creating the
 * threads fails, so a count like 2**31 - 1 must be rejected here. The bound is a
 * sanity limit far above the core count of current machines, not a tuned value. */
#define MAX_NUM_THREADS 1024

static PyObject *set_num_threads(PyObject *self, PyObject *args)
{
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) {
        return NULL;
    }
    if (n < 1 || n > MAX_NUM_THREADS) {
        PyErr_Format(PyExc_ValueError, "num_threads must lie in [1, %d], got %d", MAX_NUM_THREADS,
                     n);
        return NULL;
    }
    omp_set_num_threads(n);
    sk_blas_set_num_threads(n);
    Py_RETURN_NONE;
}

static PyObject *get_num_threads(PyObject *self, PyObject *noargs)
{
    return PyLong_FromLong(omp_get_max_threads());
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", set_num_threads, METH_VARARGS,
     "set_num_threads(n)\n\nSet the number of threads used by OpenMP loops and OpenBLAS, 1 to 1024."},
    {"get_num_threads", get_num_threads, METH_NOARGS,
     "get_num_threads() -> int\n\nReturn the number of threads the C core uses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "skupy._core",
    "skupy's C core: tensor ops with forward/backward pairs and the transformer engine.",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();

    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddFunctions(m, skupy_ops_methods) < 0 ||
        PyModule_AddFunctions(m, skupy_engine_methods) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&SkupyEngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SkupyEngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&SkupyEngineType) < 0) {
        Py_DECREF(&SkupyEngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
