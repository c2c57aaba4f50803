/* The whole recurrence of one layer direction on the CPU: the time loop of
 * recurrence.py's fused_forward / fused_backward in C, one call per pass.
 *
 * Per step t (forward): pre = xproj[t] + h[t-1] W_hh^T through the BLAS, then
 * the fused step of cpu_step.c, then (with a projection) h[t] = m[t] W_hr^T.
 * Backward, t = T-1..0: (projection: dm = (dh + d_out[t]) W_hr), the fused
 * backward step, then dh = dx[t] W_hh.  Same buffers, same order, same
 * equations as the Python loop, so the numbers are the same but for the BLAS
 * call's own rounding.
 *
 * The BLAS is MKL's Fortran sgemm_ from the libtorch_cpu already loaded in
 * the process; cpu_step.py finds it with dlsym and hands it over with
 * set_sgemm.  W_hh is packed once per call (cblas_sgemm_pack) when the
 * packed-GEMM entry points are there too, as oneDNN's RNN does.  Strides of 0
 * stand for buffers a configuration does not use (one-element placeholders).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_step.h"

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef size_t (*pack_size_fn)(int, int, int, int); /* (identifier, m, n, k) */
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162 };

static sgemm_fn sgemm_;
static pack_size_fn pack_size_;
static pack_fn pack_;
static compute_fn compute_;

void set_sgemm(void *sgemm, void *pack_size, void *pack, void *compute) {
    sgemm_ = (sgemm_fn)sgemm;
    pack_size_ = (pack_size_fn)pack_size;
    pack_ = (pack_fn)pack;
    compute_ = (compute_fn)compute;
}

/* Row-major C[M,N] = beta C + A[M,K] op(W): op(W) = W^T for W (N,K) when trans_w, else W for W (K,N). */
static void mm(int M, int N, int K, const float *A, const float *W, int trans_w, float beta, float *C) {
    const float one = 1.0f;
    const int ldw = trans_w ? K : N;
    sgemm_(trans_w ? "T" : "N", "N", &N, &M, &K, &one, W, &ldw, A, &K, &beta, C, &N);
}

/* A weight used as the right-hand factor of every step's product, packed once when the BLAS can. */
typedef struct {
    int N, K, trans;
    const float *w;
    float *packed;
} Weight;

static Weight weight(int M, int N, int K, const float *w, int trans) {
    Weight x = {N, K, trans, w, NULL};
    if (pack_ != NULL) {
        x.packed = (float *)malloc(pack_size_(B_MATRIX, M, N, K));
        if (x.packed != NULL)
            pack_(ROW_MAJOR, B_MATRIX, trans ? TRANS : NO_TRANS, M, N, K, 1.0f, w, trans ? K : N, x.packed);
    }
    return x;
}

static void mm_weight(int M, const float *A, const Weight *w, float beta, float *C) {
    if (w->packed != NULL)
        compute_(ROW_MAJOR, NO_TRANS, PACKED, M, w->N, w->K, A, w->K, w->packed, w->N, beta, C, w->N);
    else
        mm(M, w->N, w->K, A, w->w, w->trans, beta, C);
}

static void release(Weight *w) { free(w->packed); }

typedef void (*forward_step_fn)(const Params *, const float *, const float *, float *, float *, float *, float *,
                                float *, float *, const float *, const float *, float *, float *);
typedef void (*backward_step_fn)(const Params *, const float *, const float *, float *, const float *, const float *,
                                 const float *, const float *, const float *, const float *, const float *,
                                 const float *, float *, float *, float *, float *);

/* strides (elements per step) of: c_all, y_all, s_all, iz, da, act; 0 for an unused placeholder or a scratch
 * every step reuses (inference keeps nothing for a backward) */
typedef struct {
    int64_t c, y, s, iz, da, act;
} Strides;

int sequence_forward(const Params *p, int lstm, int64_t T, int64_t P, const Strides *st, const float *xproj,
                     float *h_all, float *m_all, float *c_all, float *act, float *y_all, float *s_all, float *iz,
                     const float *gamma, const float *beta, float *mu, float *var, const float *w_hh,
                     const float *w_hr, float *pre) {
    if (sgemm_ == NULL) return 1;
    const int B = (int)p->B, H = (int)p->H, GH = (lstm ? 4 : 1) * H;
    forward_step_fn step = lstm ? lstm_forward_step : rnn_forward_step;
    Weight w = weight(B, GH, (int)P, w_hh, 1), wr = {0};
    if (w_hr != NULL) wr = weight(B, (int)P, H, w_hr, 1);
    for (int64_t t = 0; t < T; t++) {
        memcpy(pre, xproj + t * B * GH, sizeof(float) * B * GH);
        mm_weight(B, h_all + t * B * P, &w, 1.0f, pre);
        step(p, pre, c_all + t * st->c, c_all + (t + 1) * st->c, m_all + t * B * H, act + t * st->act,
             y_all + t * st->y, s_all + t * st->s, iz + t * st->iz, gamma, beta, mu, var);
        if (w_hr != NULL) mm_weight(B, m_all + t * B * H, &wr, 0.0f, h_all + (t + 1) * B * P);
    }
    release(&w);
    if (w_hr != NULL) release(&wr);
    return 0;
}

/* dh (B,P) holds dL/dh_T on entry and dL/dh_0 on exit; dc likewise for the LSTM cell.  d_out (T,B,P) or NULL;
 * zero_rows: B*max(H,P) zeros.  With a projection dh_all (T,B,P) receives dh + d_out per step, dm (B,H) is
 * scratch.  With d_gamma, d_beta (the affine's gradients, double) the steps sum da*y and da into them over every
 * row and step, and da is not written. */
int sequence_backward(const Params *p, int lstm, int64_t T, int64_t P, const Strides *st, float *dh,
                      const float *d_out, float *dc, const float *act, const float *c_all, const float *y_all,
                      const float *s_all, const float *iz, const float *gamma, const float *beta, float *da,
                      float *d_pre, float *u, float *v, const float *w_hh, const float *w_hr, float *dh_all,
                      float *dm, const float *zero_rows, double *d_gamma, double *d_beta) {
    if (sgemm_ == NULL) return 1;
    Params q = *p; /* the steps sum the affine's gradients into d_gamma, d_beta (NULL: none) */
    q.d_gamma = d_gamma;
    q.d_beta = d_beta;
    p = &q;
    const int B = (int)p->B, H = (int)p->H, GH = (lstm ? 4 : 1) * H;
    backward_step_fn step = lstm ? lstm_backward_step : rnn_backward_step;
    Weight w = weight(B, (int)P, GH, w_hh, 0), wr = {0};
    if (w_hr != NULL) wr = weight(B, H, (int)P, w_hr, 0);
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *d_kernel = dh, *d_out_t = d_out != NULL ? d_out + t * B * P : zero_rows;
        if (w_hr != NULL) { /* h = m W_hr^T: the kernel gets dm = (dh + d_out) W_hr as its dh */
            float *sum = dh_all + t * B * P;
            for (int64_t j = 0; j < (int64_t)B * P; j++) sum[j] = dh[j] + d_out_t[j];
            mm_weight(B, sum, &wr, 0.0f, dm);
            d_kernel = dm;
            d_out_t = zero_rows;
        }
        step(p, d_kernel, d_out_t, dc, act + t * B * GH, c_all + t * st->c, c_all + (t + 1) * st->c,
             y_all + t * st->y, s_all + t * st->s, iz + t * st->iz, gamma, beta, da + t * st->da,
             d_pre + t * B * GH, u, v);
        mm_weight(B, d_pre + t * B * GH, &w, 0.0f, dh);
    }
    release(&w);
    if (w_hr != NULL) release(&wr);
    return 0;
}

/* The GRU's time loop (cpu_step.c's gru_*_step): per step gh = h W_hh^T + b_hh into the scratch gh (B,3H), then
 * the step; ghn_all (T,B,H) keeps each step's W_hn h + b_hn.  b_hh may be NULL (bias=False). */
int gru_sequence_forward(const Params *p, int64_t T, const Strides *st, const float *xproj, float *h_all, float *act,
                         float *y_all, float *s_all, float *iz, const float *gamma, const float *beta, float *mu,
                         float *var, const float *w_hh, const float *b_hh, float *ghn_all, float *gh) {
    if (sgemm_ == NULL) return 1;
    const int B = (int)p->B, H = (int)p->H, GH = 3 * H;
    Weight w = weight(B, GH, H, w_hh, 1);
    for (int64_t t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) {
            if (b_hh != NULL)
                memcpy(gh + (int64_t)b * GH, b_hh, sizeof(float) * GH);
            else
                memset(gh + (int64_t)b * GH, 0, sizeof(float) * GH);
        }
        mm_weight(B, h_all + t * B * H, &w, 1.0f, gh);
        gru_forward_step(p, xproj + t * B * GH, gh, h_all + t * B * H, h_all + (t + 1) * B * H, act + t * B * GH,
                         y_all + t * st->y, s_all + t * st->s, iz + t * st->iz, gamma, beta, mu, var,
                         ghn_all + t * B * H);
    }
    release(&w);
    return 0;
}

/* dh (B,H): dL/dh_T in, dL/dh_0 out.  d_pre (T,B,3H) receives dL/dxproj, d_gh (T,B,3H) dL/d(W_hh h + b_hh);
 * dh_direct (B,H) is scratch; the affine's sums as in sequence_backward. */
int gru_sequence_backward(const Params *p, int64_t T, const Strides *st, float *dh, const float *d_out,
                          const float *h_all, const float *act, const float *ghn_all, const float *y_all,
                          const float *s_all, const float *iz, const float *gamma, const float *beta, float *da,
                          float *d_pre, float *d_gh, float *u, float *v, const float *w_hh, const float *zero_rows,
                          float *dh_direct, double *d_gamma, double *d_beta) {
    if (sgemm_ == NULL) return 1;
    Params q = *p; /* the steps sum the affine's gradients into d_gamma, d_beta (NULL: none) */
    q.d_gamma = d_gamma;
    q.d_beta = d_beta;
    p = &q;
    const int B = (int)p->B, H = (int)p->H, GH = 3 * H;
    Weight w = weight(B, H, GH, w_hh, 0);
    for (int64_t t = T - 1; t >= 0; t--) {
        gru_backward_step(p, dh, d_out != NULL ? d_out + t * B * H : zero_rows, dh_direct, act + t * B * GH,
                          h_all + t * B * H, ghn_all + t * B * H, y_all + t * st->y, s_all + t * st->s,
                          iz + t * st->iz, gamma, beta, da + t * st->da, d_pre + t * B * GH, d_gh + t * B * GH, u, v);
        memcpy(dh, dh_direct, sizeof(float) * B * H);
        mm_weight(B, d_gh + t * B * GH, &w, 1.0f, dh);
    }
    release(&w);
    return 0;
}
