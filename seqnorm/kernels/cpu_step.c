/* One time step of a normalized LSTM/RNN layer on the CPU: the C twin of the
 * Triton kernels in step.py (same equations, same arguments, same row order;
 * see step.py's docstring for the math and docs/design.md §2 for the equations).
 * float32 only.  Built at first use by cpu_step.py and called through ctypes.
 *
 * Within each gate, rows are processed in order 0..B-1, every feature of a
 * row before the next row; the Online Normalization state (mu, var forward;
 * u, v backward) is updated in place; an update whose result is not finite
 * leaves that feature's state as it was (mu, var together; u, v together).
 * The LSTM's four gates have separate states, so with OpenMP (torch's
 * intra-op threads) they run on separate threads, and the cell's rows are
 * split over them: the same numbers as one thread.  Each row is done in a few
 * passes over its features so that the compiler vectorizes the loops.  d_out
 * (dL/d output of the step) is never NULL: a zero row stands for a missing one.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_step.h"

enum { NORM_NONE = 0, NORM_ONLINE = 1, NORM_LAYER = 2 };
enum { ECM_NONE = 0, ECM_LS = 1, ECM_AC = 2 };

/* Finite test on the exponent bits: branch-free, so that the loops around it vectorize. */
static inline int finitef_(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}

/* Threads for a step of `work` elements: torch's intra-op threads (OpenMP is shared with torch's libgomp) when
 * the step is large enough to pay for a parallel region; 1 when built without OpenMP. */
#ifdef _OPENMP
#include <omp.h>
static inline int threads_for(int64_t work) {
    int n = omp_get_max_threads();
    return work >= 8192 && n > 1 ? (n < 4 ? n : 4) : 1;
}
#else
static inline int threads_for(int64_t work) {
    (void)work;
    return 1;
}
#endif

/* A sum over features in vector lanes (built with -fopenmp-simd; no -ffast-math, which would change the
 * process's floating-point mode and give CPU-specific approximations): the order of the additions is fixed by
 * the build's target ISA (cpu_step.py), so the same build gives the same bits on every CPU. */
#define SIMD_PRAGMA(x) _Pragma(#x)
#define SIMD_SUM(...) SIMD_PRAGMA(omp simd reduction(+ : __VA_ARGS__))

/* fmaxf / fminf as selects, which vectorize without -ffinite-math-only; a NaN x gives y, as fmaxf(NaN, y) does. */
static inline float max_(float x, float y) { return x > y ? x : y; }
static inline float min_(float x, float y) { return x < y ? x : y; }

/* exp(x) in plain arithmetic, so that the loops around it vectorize with no vector math library (glibc's expf
 * vectorizes only under -ffast-math): x = n ln2 + r with n = round(x / ln2) and ln2 split in two (Cody-Waite),
 * exp(r) by Cephes' degree-6 polynomial (max relative error about 2 ulp on |r| <= ln2 / 2), times 2^n built in
 * the exponent bits (under 1 ulp from exp on [-87, 88]).  x is clamped to [-87, 88], where 2^n is a normal
 * float: exp(-87) = 1.6e-38 stands for anything smaller and exp(88) = 1.7e38 for anything larger, so sigmoid and
 * tanh saturate to their limits; a NaN stays NaN.  The same instructions on every CPU of the build's ISA give the
 * same bits (cpu_step.py fixes the ISA). */
static inline float expf_(float in) {
    float x = min_(max_(in, -87.0f), 88.0f); /* a NaN becomes -87 here, and is given back at the end */
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    float n = (x * 1.44269504088896341f + shift) - shift;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return in == in ? p * scale : in;
}

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf_(-x)); }

static inline float tanhf_(float x) {
    float e = expf_(-2.0f * fabsf(x));
    float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

/* One gate of one row: x -> z (H features).  Stores y, s (and iz), updates mu, var in training. */
static void gate_forward(const Params *p, const float *x, float *mu, float *var, const float *gamma,
                         const float *beta, float *y, float *s, float *iz, float *z) {
    const int64_t H = p->H;
    if (p->norm == NORM_NONE) {
        for (int64_t j = 0; j < H; j++) z[j] = x[j];
        return;
    }
    if (p->norm == NORM_ONLINE) {
        const float a = p->alpha, eps = p->eps;
        for (int64_t j = 0; j < H; j++) {
            float sj = 1.0f / sqrtf(var[j] + eps); /* eq. 8a: the state before this row */
            float d = x[j] - mu[j];
            s[j] = sj;
            y[j] = d * sj;
            if (p->training) {
                float nv = a * var[j] + a * (1.0f - a) * d * d; /* eq. 8c */
                float nm = mu[j] + (1.0f - a) * d;             /* eq. 8b */
                int ok = finitef_(nv) & finitef_(nm);         /* a non-finite sample never enters the state */
                var[j] = ok ? nv : var[j];
                mu[j] = ok ? nm : mu[j];
            }
        }
    } else {
        float mean = 0.0f, sq = 0.0f;
        SIMD_SUM(mean)
        for (int64_t j = 0; j < H; j++) mean += x[j];
        mean /= (float)H;
        SIMD_SUM(sq)
        for (int64_t j = 0; j < H; j++) sq += (x[j] - mean) * (x[j] - mean);
        float sj = 1.0f / sqrtf(sq / (float)H + p->eps);
        for (int64_t j = 0; j < H; j++) {
            s[j] = sj;
            y[j] = (x[j] - mean) * sj;
        }
    }
    for (int64_t j = 0; j < H; j++) z[j] = p->affine ? y[j] * gamma[j] + beta[j] : y[j];
    if (p->norm == NORM_ONLINE && p->ecm == ECM_LS) { /* eq. 9 */
        float ms = 0.0f;
        SIMD_SUM(ms)
        for (int64_t j = 0; j < H; j++) ms += z[j] * z[j];
        float inv = 1.0f / sqrtf(ms / (float)H + p->ls_eps);
        *iz = inv;
        for (int64_t j = 0; j < H; j++) z[j] *= inv;
    } else if (p->norm == NORM_ONLINE && p->ecm == ECM_AC) {
        const float c = p->clamp_value;
        for (int64_t j = 0; j < H; j++) z[j] = min_(max_(z[j], -c), c);
    }
}

/* One gate of one row, in place: d (dL/dz on entry) -> dL/dx.  Stores da (affine), updates u, v in training. */
static void gate_backward(const Params *p, float *d, const float *y, const float *s, const float *iz,
                          const float *gamma, const float *beta, float *da, float *u, float *v, int64_t feature) {
    const int64_t H = p->H;
    if (p->norm == NORM_NONE) return;
    if (p->norm == NORM_ONLINE && p->ecm == ECM_LS) { /* eq. 10 */
        const float inv = *iz;
        float m = 0.0f;
        SIMD_SUM(m)
        for (int64_t j = 0; j < H; j++) m += (p->affine ? y[j] * gamma[j] + beta[j] : y[j]) * inv * d[j];
        m /= (float)H;
        for (int64_t j = 0; j < H; j++) d[j] = (d[j] - (p->affine ? y[j] * gamma[j] + beta[j] : y[j]) * inv * m) * inv;
    } else if (p->norm == NORM_ONLINE && p->ecm == ECM_AC) {
        const float c = p->clamp_value;
        for (int64_t j = 0; j < H; j++) {
            float a = p->affine ? y[j] * gamma[j] + beta[j] : y[j];
            d[j] = fabsf(a) < c ? d[j] : 0.0f;
        }
    }
    if (p->affine && p->d_gamma != NULL) { /* summed here, where da and y are at hand: da is not stored */
        double *restrict dg = p->d_gamma + feature, *restrict db = p->d_beta + feature;
        for (int64_t j = 0; j < H; j++) {
            dg[j] += (double)(d[j] * y[j]);
            db[j] += (double)d[j];
            d[j] *= gamma[j];
        }
    } else if (p->affine) {
        for (int64_t j = 0; j < H; j++) {
            da[j] = d[j];
            d[j] *= gamma[j];
        }
    }
    if (p->norm == NORM_ONLINE) {
        const float bb = p->beta_b, floor_ = p->v_decay_min;
        for (int64_t j = 0; j < H; j++) {
            if (p->training) {
                float gt = d[j] - bb * v[j] * y[j];                   /* eq. 11a */
                float decay = max_(1.0f - bb * y[j] * y[j], floor_); /* eq. 11b, v + gt y, with the floor */
                float nv = decay * v[j] + d[j] * y[j];
                float dx = gt * s[j] - bb * u[j]; /* eq. 12a */
                float nu = u[j] + dx;             /* eq. 12b */
                int ok = finitef_(nv) & finitef_(nu);
                v[j] = ok ? nv : v[j];
                u[j] = ok ? nu : u[j];
                d[j] = dx;
            } else {
                d[j] *= s[j];
            }
        }
    } else {
        float mdy = 0.0f, mdyy = 0.0f;
        SIMD_SUM(mdy, mdyy)
        for (int64_t j = 0; j < H; j++) {
            mdy += d[j];
            mdyy += d[j] * y[j];
        }
        mdy /= (float)H;
        mdyy /= (float)H;
        for (int64_t j = 0; j < H; j++) d[j] = (d[j] - mdy - y[j] * mdyy) * s[j];
    }
}

/* c' = f c + i g, h' = o tanh(c'); i, f, g, o hold the gate pre-activations on entry, the activations on exit. */
static void lstm_cell_forward(int64_t H, float *restrict i, float *restrict f, float *restrict g, float *restrict o,
                              const float *restrict c_prev, float *restrict c_next, float *restrict h_next) {
    for (int64_t j = 0; j < H; j++) {
        i[j] = sigmoidf_(i[j]);
        f[j] = sigmoidf_(f[j]);
        g[j] = tanhf_(g[j]);
        o[j] = sigmoidf_(o[j]);
        float c = f[j] * c_prev[j] + i[j] * g[j];
        c_next[j] = c;
        h_next[j] = o[j] * tanhf_(c);
    }
}

/* dz of the four gates from dh (+ d_out) and the carried dc, which becomes dL/dc[t-1]. */
static void lstm_cell_backward(int64_t H, const float *restrict i, const float *restrict f, const float *restrict g,
                               const float *restrict o, const float *restrict c_prev, const float *restrict c_next,
                               const float *restrict dh, const float *restrict d_out, float *restrict dc,
                               float *restrict dzi, float *restrict dzf, float *restrict dzg, float *restrict dzo) {
    for (int64_t j = 0; j < H; j++) {
        float dhj = dh[j] + d_out[j];
        float tc = tanhf_(c_next[j]);
        float dcj = dc[j] + dhj * o[j] * (1.0f - tc * tc);
        dzi[j] = dcj * g[j] * i[j] * (1.0f - i[j]);
        dzf[j] = dcj * c_prev[j] * f[j] * (1.0f - f[j]);
        dzg[j] = dcj * i[j] * (1.0f - g[j] * g[j]);
        dzo[j] = dhj * tc * o[j] * (1.0f - o[j]);
        dc[j] = dcj * f[j];
    }
}

void lstm_forward_step(const Params *p, const float *pre, const float *c_prev, float *c_next, float *h_next,
                       float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                       float *var) {
    const int64_t H = p->H, GH = 4 * H, B = p->B;
    /* the four gates are independent: one thread each, rows in order within a gate (the state's order) */
#pragma omp parallel for schedule(static) num_threads(threads_for(B * GH)) if (threads_for(B * GH) > 1)
    for (int k = 0; k < 4; k++)
        for (int64_t b = 0; b < B; b++) /* z of gate k into act, made the activation below */
            gate_forward(p, pre + b * GH + k * H, mu + k * H, var + k * H, gamma + k * H, beta + k * H,
                         y + b * GH + k * H, s + b * GH + k * H, iz + b * 4 + k, act + b * GH + k * H);
#pragma omp parallel for schedule(static) num_threads(threads_for(B * GH)) if (threads_for(B * GH) > 1)
    for (int64_t b = 0; b < B; b++) {
        float *i = act + b * GH;
        lstm_cell_forward(H, i, i + H, i + 2 * H, i + 3 * H, c_prev + b * H, c_next + b * H, h_next + b * H);
    }
}

void lstm_backward_step(const Params *p, const float *dh, const float *d_out, float *dc, const float *act,
                        const float *c_prev, const float *c_next, const float *y, const float *s, const float *iz,
                        const float *gamma, const float *beta, float *da, float *dx, float *u, float *v) {
    const int64_t H = p->H, GH = 4 * H, B = p->B;
#pragma omp parallel for schedule(static) num_threads(threads_for(B * GH)) if (threads_for(B * GH) > 1)
    for (int64_t b = 0; b < B; b++) {
        const int64_t row = b * GH, hrow = b * H;
        const float *i = act + row;
        float *dz = dx + row;
        lstm_cell_backward(H, i, i + H, i + 2 * H, i + 3 * H, c_prev + hrow, c_next + hrow, dh + hrow, d_out + hrow,
                           dc + hrow, dz, dz + H, dz + 2 * H, dz + 3 * H);
    }
    /* then each gate's normalization backward, one thread per gate, rows in order (the control state's order) */
#pragma omp parallel for schedule(static) num_threads(threads_for(B * GH)) if (threads_for(B * GH) > 1)
    for (int k = 0; k < 4; k++)
        for (int64_t b = 0; b < B; b++)
            gate_backward(p, dx + b * GH + k * H, y + b * GH + k * H, s + b * GH + k * H, iz + b * 4 + k,
                          gamma + k * H, beta + k * H, da + b * GH + k * H, u + k * H, v + k * H, k * H);
}

void rnn_forward_step(const Params *p, const float *pre, const float *c_prev, float *c_next, float *h_next,
                      float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                      float *var) {
    (void)c_prev;
    (void)c_next;
    const int64_t H = p->H;
    for (int64_t b = 0; b < p->B; b++) {
        const int64_t row = b * H;
        float *restrict h = act + row, *restrict hn = h_next + row;
        gate_forward(p, pre + row, mu, var, gamma, beta, y + row, s + row, iz + b, h);
        for (int64_t j = 0; j < H; j++) {
            h[j] = p->relu ? max_(h[j], 0.0f) : tanhf_(h[j]);
            hn[j] = h[j];
        }
    }
}

void rnn_backward_step(const Params *p, const float *dh, const float *d_out, float *dc, const float *act,
                       const float *c_prev, const float *c_next, const float *y, const float *s, const float *iz,
                       const float *gamma, const float *beta, float *da, float *dx, float *u, float *v) {
    (void)dc;
    (void)c_prev;
    (void)c_next;
    const int64_t H = p->H;
    for (int64_t b = 0; b < p->B; b++) {
        const int64_t row = b * H;
        const float *restrict dhr = dh + row, *restrict dor = d_out + row, *restrict h = act + row;
        float *restrict dz = dx + row;
        for (int64_t j = 0; j < H; j++) {
            float dhj = dhr[j] + dor[j];
            dz[j] = p->relu ? (h[j] > 0.0f ? dhj : 0.0f) : dhj * (1.0f - h[j] * h[j]);
        }
        gate_backward(p, dx + row, y + row, s + row, iz + b, gamma, beta, da + row, u, v, 0);
    }
}

/* GRU (gates r, z, n; docs/gru.md).  xp = W_ih x + b_ih and gh = W_hh h + b_hh, both (B, 3H).  r and z normalize
 * a = xp + gh, n normalizes a_n = xp_n + r * gh_n; h' = (1 - z) n + z h.  act holds r, z, n; ghn keeps gh_n for
 * the backward.  Each gate's features have their own state, rows in order. */
void gru_forward_step(const Params *p, const float *xp, const float *gh, const float *h_prev, float *h_next,
                      float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                      float *var, float *ghn) {
    const int64_t H = p->H, GH = 3 * H;
    for (int64_t b = 0; b < p->B; b++) {
        const int64_t row = b * GH, hrow = b * H;
        float *r = act + row, *z = r + H, *n = r + 2 * H; /* one buffer (r's loop below writes z): not restrict */
        const float *restrict x = xp + row, *restrict g = gh + row;
        for (int64_t j = 0; j < 2 * H; j++) r[j] = x[j] + g[j];
        for (int k = 0; k < 2; k++) /* normalized in place, then the sigmoid */
            gate_forward(p, r + k * H, mu + k * H, var + k * H, gamma + k * H, beta + k * H, y + row + k * H,
                         s + row + k * H, iz + b * 3 + k, r + k * H);
        for (int64_t j = 0; j < 2 * H; j++) r[j] = sigmoidf_(r[j]);
        for (int64_t j = 0; j < H; j++) {
            ghn[hrow + j] = g[2 * H + j];
            n[j] = x[2 * H + j] + r[j] * g[2 * H + j];
        }
        gate_forward(p, n, mu + 2 * H, var + 2 * H, gamma + 2 * H, beta + 2 * H, y + row + 2 * H, s + row + 2 * H,
                     iz + b * 3 + 2, n);
        for (int64_t j = 0; j < H; j++) {
            n[j] = tanhf_(n[j]);
            h_next[hrow + j] = (1.0f - z[j]) * n[j] + z[j] * h_prev[hrow + j];
        }
    }
}

/* dh + d_out -> dx = dL/dxp and dgh = dL/dgh (B, 3H; they differ in n's part: dgh_n = da_n * r), and
 * dh_direct = dL/dh through h' = ... + z h only (the W_hh path is the caller's product dgh W_hh). */
void gru_backward_step(const Params *p, const float *dh, const float *d_out, float *dh_direct, const float *act,
                       const float *h_prev, const float *ghn, const float *y, const float *s, const float *iz,
                       const float *gamma, const float *beta, float *da, float *dx, float *dgh, float *u, float *v) {
    const int64_t H = p->H, GH = 3 * H;
    for (int64_t b = 0; b < p->B; b++) {
        const int64_t row = b * GH, hrow = b * H;
        const float *r = act + row, *z = r + H, *n = r + 2 * H;  /* each three views of one buffer: */
        float *dr = dx + row, *dz = dr + H, *dn = dr + 2 * H, *dg = dgh + row; /* not restrict */
        SIMD_PRAGMA(omp simd) /* safe: the views are disjoint H-ranges (dx, dh_direct and act are other buffers) */
        for (int64_t j = 0; j < H; j++) {
            float dht = dh[hrow + j] + d_out[hrow + j];
            dn[j] = dht * (1.0f - z[j]) * (1.0f - n[j] * n[j]);
            dz[j] = dht * (h_prev[hrow + j] - n[j]) * z[j] * (1.0f - z[j]);
            dh_direct[hrow + j] = dht * z[j];
        }
        gate_backward(p, dn, y + row + 2 * H, s + row + 2 * H, iz + b * 3 + 2, gamma + 2 * H, beta + 2 * H,
                      da + row + 2 * H, u + 2 * H, v + 2 * H, 2 * H); /* dn -> dL/da_n */
        for (int64_t j = 0; j < H; j++) {
            dg[2 * H + j] = dn[j] * r[j];
            dr[j] = dn[j] * ghn[hrow + j] * r[j] * (1.0f - r[j]);
        }
        for (int k = 0; k < 2; k++)
            gate_backward(p, dr + k * H, y + row + k * H, s + row + k * H, iz + b * 3 + k, gamma + k * H,
                          beta + k * H, da + row + k * H, u + k * H, v + k * H, k * H);
        for (int64_t j = 0; j < 2 * H; j++) dg[j] = dr[j];
    }
}
