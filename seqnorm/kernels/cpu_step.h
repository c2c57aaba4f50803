/* The per-step kernels of cpu_step.c, for cpu_sequence.c's time loop. */
#ifndef SEQNORM_CPU_STEP_H
#define SEQNORM_CPU_STEP_H
#include <stdint.h>

typedef struct {
    int64_t B, H;
    int32_t norm, ecm, affine, training, relu;
    float alpha, eps, ls_eps, clamp_value, beta_b; /* beta_b = 1 - alpha_bkw */
    float v_decay_min;                             /* floor on v's decay; -FLT_MAX for none */
    double *d_gamma, *d_beta; /* NULL, or the affine's gradients, summed into by the backward (cpu_sequence.c) */
} Params;

void lstm_forward_step(const Params *p, const float *pre, const float *c_prev, float *c_next, float *h_next,
                       float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                       float *var);
void rnn_forward_step(const Params *p, const float *pre, const float *c_prev, float *c_next, float *h_next,
                      float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                      float *var);
void lstm_backward_step(const Params *p, const float *dh, const float *d_out, float *dc, const float *act,
                        const float *c_prev, const float *c_next, const float *y, const float *s, const float *iz,
                        const float *gamma, const float *beta, float *da, float *dx, float *u, float *v);
void rnn_backward_step(const Params *p, const float *dh, const float *d_out, float *dc, const float *act,
                       const float *c_prev, const float *c_next, const float *y, const float *s, const float *iz,
                       const float *gamma, const float *beta, float *da, float *dx, float *u, float *v);
void gru_forward_step(const Params *p, const float *xp, const float *gh, const float *h_prev, float *h_next,
                      float *act, float *y, float *s, float *iz, const float *gamma, const float *beta, float *mu,
                      float *var, float *ghn);
void gru_backward_step(const Params *p, const float *dh, const float *d_out, float *dh_direct, const float *act,
                       const float *h_prev, const float *ghn, const float *y, const float *s, const float *iz,
                       const float *gamma, const float *beta, float *da, float *dx, float *dgh, float *u, float *v);
#endif
