/* Fused elementwise kernels for the merge methods' hot loops (forgetless.methods.fast.kernels wraps them).

   Each kernel does in one pass over memory what the pure-torch rule does in several torch operations, with the
   same float32 operations in the same order, so that its result is the torch rule's bit for bit (the tests hold
   the two side by side). Built without -ffast-math and with -ffp-contract=off: no operation is reordered, fused
   into an FMA or assumed free of NaN. The caller passes the data pointers of contiguous float32 tensors it has
   checked; the kernels release the GIL while they run. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 1024 /* entries per block of the TIES kernel: its per-model temporaries stay in L1/L2 */
#define MAX_MODELS 64

/* torch.nn.functional.hardshrink: 0 where -l <= x <= l, x elsewhere (NaN kept) */
static inline float hardshrink(float x, float l) { return (x >= -l && x <= l) ? 0.0f : x; }

static const int POPCOUNT4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

/* The count and gather of count_gather over x = p (b NULL) or x = |p - b|; diff is a constant at each call, so
   that the compiler makes one loop of each. */
static inline void tally(const float *restrict p, const float *restrict b, const int diff, Py_ssize_t n, float lo,
                         float hi, int largest, float *restrict values, int32_t *restrict index, long long *beyond_out,
                         long long *inside_out) {
    long long beyond = 0, inside = 0;
    Py_ssize_t i = 0;
#if defined(__SSE2__)
    const __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi), sign = _mm_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        __m128 x0 = _mm_loadu_ps(p + i), x1 = _mm_loadu_ps(p + i + 4);
        if (diff) {
            x0 = _mm_andnot_ps(sign, _mm_sub_ps(x0, _mm_loadu_ps(b + i)));
            x1 = _mm_andnot_ps(sign, _mm_sub_ps(x1, _mm_loadu_ps(b + i + 4)));
        }
        const int out0 = _mm_movemask_ps(largest ? _mm_cmpgt_ps(x0, vhi) : _mm_cmplt_ps(x0, vlo));
        const int out1 = _mm_movemask_ps(largest ? _mm_cmpgt_ps(x1, vhi) : _mm_cmplt_ps(x1, vlo));
        beyond += POPCOUNT4[out0] + POPCOUNT4[out1];
        int in = _mm_movemask_ps(_mm_and_ps(_mm_cmpge_ps(x0, vlo), _mm_cmple_ps(x0, vhi)))
                 | _mm_movemask_ps(_mm_and_ps(_mm_cmpge_ps(x1, vlo), _mm_cmple_ps(x1, vhi))) << 4;
        if (in) {
            float x[8];
            _mm_storeu_ps(x, x0);
            _mm_storeu_ps(x + 4, x1);
            do {
                const int j = __builtin_ctz(in);
                values[inside] = x[j];
                index[inside++] = (int32_t)(i + j);
                in &= in - 1;
            } while (in);
        }
    }
#endif
    for (; i < n; i++) {
        const float x = diff ? fabsf(p[i] - b[i]) : p[i];
        beyond += largest ? x > hi : x < lo;
        if (x >= lo && x <= hi) {
            values[inside] = x;
            index[inside++] = (int32_t)i;
        }
    }
    *beyond_out = beyond;
    *inside_out = inside;
}

/* count_gather(p, b, n, lo, hi, largest, values, index) -> (beyond, inside): over x = p, or x = |p - b| when b is
   not 0, the entries beyond the bracket (x > hi when largest, else x < lo) counted, and those inside it
   (lo <= x <= hi; never NaN) written to values with their index, in order. values and index hold n entries. */
static PyObject *count_gather(PyObject *self, PyObject *args) {
    unsigned long long pp, bp, vp, ip;
    Py_ssize_t n;
    double lo, hi;
    int largest;
    if (!PyArg_ParseTuple(args, "KKnddpKK", &pp, &bp, &n, &lo, &hi, &largest, &vp, &ip)) return NULL;
    const float *p = (const float *)(uintptr_t)pp, *b = (const float *)(uintptr_t)bp;
    float *values = (float *)(uintptr_t)vp;
    int32_t *index = (int32_t *)(uintptr_t)ip;
    long long beyond, inside;
    Py_BEGIN_ALLOW_THREADS
    if (b)
        tally(p, b, 1, n, (float)lo, (float)hi, largest, values, index, &beyond, &inside);
    else
        tally(p, NULL, 0, n, (float)lo, (float)hi, largest, values, index, &beyond, &inside);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("LL", beyond, inside);
}

/* histogram(a, b, n, hist): hist[key >> 16] += 1 for key the float32 bits of each x = |a - b| (non-negative, so
   that the bits order as the values do), NaN left out; hist holds 32768 int64 counts. */
static PyObject *histogram(PyObject *self, PyObject *args) {
    unsigned long long ap, bp, hp;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKnK", &ap, &bp, &n, &hp)) return NULL;
    const float *restrict a = (const float *)(uintptr_t)ap, *restrict b = (const float *)(uintptr_t)bp;
    int64_t *restrict hist = (int64_t *)(uintptr_t)hp;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        union { float f; uint32_t u; } x = {fabsf(a[i] - b[i])};
        if (x.u <= 0x7F800000u) hist[x.u >> 16]++; /* above: NaN */
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int unpack(PyObject *tuple, int m, unsigned long long *ptrs, double *floats, long long *ints) {
    for (int k = 0; k < m; k++) {
        PyObject *o = PyTuple_GET_ITEM(tuple, k);
        if (ptrs) ptrs[k] = PyLong_AsUnsignedLongLong(o);
        if (floats) floats[k] = PyFloat_AsDouble(o);
        if (ints) ints[k] = PyLong_AsLongLong(o);
    }
    return PyErr_Occurred() ? -1 : 0;
}

/* ties(base, finetuned, n, below, value, split, weights, lambda, frequency): TIES on n entries, in place on base
   (forgetless.methods.fast.baselines, the "mergekit" convention): per model k, Δ = θk − θ0 trimmed by its cut (kept
   where |Δ| > below[k] for the first split[k] entries, > value[k] after: hardshrink), times weights[k] when any
   weight is not 1; the sign elected (of the sum, or of the sum of signs with frequency; 0 counts as +); the
   agreeing entries summed and divided by the agreeing models' summed weights (max(den, 1) when every weight is
   at least 1, else den + (den == 0)); times lambda when it is not 1; added to θ0. */
static PyObject *ties(PyObject *self, PyObject *args) {
    unsigned long long bp;
    PyObject *fto, *belowo, *valueo, *splito, *wo;
    Py_ssize_t n;
    double lambda_d;
    int frequency;
    if (!PyArg_ParseTuple(args, "KO!nO!O!O!O!dp", &bp, &PyTuple_Type, &fto, &n, &PyTuple_Type, &belowo,
                          &PyTuple_Type, &valueo, &PyTuple_Type, &splito, &PyTuple_Type, &wo, &lambda_d, &frequency))
        return NULL;
    const int m = (int)PyTuple_GET_SIZE(fto);
    if (m < 1 || m > MAX_MODELS || PyTuple_GET_SIZE(belowo) != m || PyTuple_GET_SIZE(valueo) != m
        || PyTuple_GET_SIZE(splito) != m || PyTuple_GET_SIZE(wo) != m) {
        PyErr_SetString(PyExc_ValueError, "ties: 1 to 64 models, one cut and weight each");
        return NULL;
    }
    unsigned long long ftp[MAX_MODELS];
    double below_d[MAX_MODELS], value_d[MAX_MODELS], w_d[MAX_MODELS];
    long long split[MAX_MODELS];
    if (unpack(fto, m, ftp, NULL, NULL) || unpack(belowo, m, NULL, below_d, NULL)
        || unpack(valueo, m, NULL, value_d, NULL) || unpack(splito, m, NULL, NULL, split)
        || unpack(wo, m, NULL, w_d, NULL))
        return NULL;
    float below[MAX_MODELS], value[MAX_MODELS], w[MAX_MODELS];
    int weighted = 0, clamp_den = 1;
    for (int k = 0; k < m; k++) {
        below[k] = (float)below_d[k];
        value[k] = (float)value_d[k];
        w[k] = (float)w_d[k];
        weighted |= w_d[k] != 1.0;
        clamp_den &= w_d[k] >= 1.0;
    }
    const float lambda = (float)lambda_d;
    const int scale = lambda_d != 1.0;
    float *t = malloc(sizeof(float) * BLOCK * (m + 3));
    if (!t) return PyErr_NoMemory();
    float *sign = t + BLOCK * m, *num = sign + BLOCK, *den = num + BLOCK;
    float *base = (float *)(uintptr_t)bp;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j0 = 0; j0 < n; j0 += BLOCK) {
        const Py_ssize_t nb = n - j0 < BLOCK ? n - j0 : BLOCK;
        float *restrict b = base + j0;
        for (int k = 0; k < m; k++) { /* the trimmed (and weighted) Δk */
            const float *restrict f = (const float *)(uintptr_t)ftp[k] + j0;
            float *restrict tk = t + BLOCK * k;
            Py_ssize_t at = split[k] - j0;
            at = at < 0 ? 0 : at > nb ? nb : at;
            const float lb = below[k], lv = value[k];
            for (Py_ssize_t j = 0; j < at; j++) tk[j] = hardshrink(f[j] - b[j], lb);
            for (Py_ssize_t j = at; j < nb; j++) tk[j] = hardshrink(f[j] - b[j], lv);
            if (weighted) {
                const float wk = w[k];
                for (Py_ssize_t j = 0; j < nb; j++) tk[j] = tk[j] * wk;
            }
        }
        /* the elected sign, summed in torch's order: (Δ0 + Δ1) + Δ2 ..., or 0 + Δ0 for one model */
        if (frequency) {
            for (Py_ssize_t j = 0; j < nb; j++) sign[j] = 0.0f;
            for (int k = 0; k < m; k++) {
                const float *restrict tk = t + BLOCK * k;
                for (Py_ssize_t j = 0; j < nb; j++) {
                    const float x = tk[j];
                    sign[j] = sign[j] + (x > 0 ? 1.0f : x < 0 ? -1.0f : 0.0f); /* torch.sign: 0 for ±0 and NaN */
                }
            }
        } else if (m == 1) {
            for (Py_ssize_t j = 0; j < nb; j++) sign[j] = 0.0f + t[j];
        } else {
            for (Py_ssize_t j = 0; j < nb; j++) sign[j] = t[j] + t[BLOCK + j];
            for (int k = 2; k < m; k++) {
                const float *restrict tk = t + BLOCK * k;
                for (Py_ssize_t j = 0; j < nb; j++) sign[j] = sign[j] + tk[j];
            }
        }
        for (Py_ssize_t j = 0; j < nb; j++) {
            const float a = sign[j];
            sign[j] = a < 0 ? -1.0f : 1.0f; /* sign(sign(a) + 0.5): a NaN sum elects + too */
            num[j] = 0.0f;
            den[j] = 0.0f;
        }
        for (int k = 0; k < m; k++) { /* the disjoint sum: Δk where it agrees with the sign */
            const float *restrict tk = t + BLOCK * k;
            const float wk = w[k];
            for (Py_ssize_t j = 0; j < nb; j++) {
                const float d = tk[j] * sign[j];
                den[j] = den[j] + (d > 0 ? wk : 0.0f);
                num[j] = num[j] + (d < 0 ? 0.0f : d);
            }
        }
        for (Py_ssize_t j = 0; j < nb; j++) {
            float d = den[j];
            d = clamp_den ? (d < 1.0f ? 1.0f : d) : d + (d == 0.0f ? 1.0f : 0.0f);
            float mixed = (num[j] * sign[j]) / d;
            if (scale) mixed = mixed * lambda;
            b[j] = b[j] + mixed;
        }
    }
    Py_END_ALLOW_THREADS
    free(t);
    Py_RETURN_NONE;
}

static PyMethodDef METHODS[] = {
    {"count_gather", count_gather, METH_VARARGS,
     "count_gather(p, b, n, lo, hi, largest, values, index) -> (beyond, inside), over p or |p - b|"},
    {"histogram", histogram, METH_VARARGS, "histogram(a, b, n, hist): counts of the top 16 bits of |a - b|"},
    {"ties", ties, METH_VARARGS,
     "ties(base, finetuned, n, below, value, split, weights, lambda, frequency): TIES in place on base"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels", "Fused elementwise kernels", -1, METHODS};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&MODULE); }
