// Runs pursuit_loop (pursuit.cu, included by the build as kernel.cu) on the host: one process per block, one
// thread per CUDA thread (launch.h).
#include "launch.h"
#include "kernel.cu"

struct LoopArgs {
    float *B, *err; int* ftype; float* residual; const float *T, *lam_mu, *lmm, *mu; const long long* neighbors;
    const float* xcorr; const long long* ftemp; unsigned char* flags; int* block_count; unsigned int* sync;
    long long *st_all, *ids_all; float *y_all, *x_all, *feat_all; int* counts;
    int n, C, K, nt0, M, n_near, n_iter, capacity; float thr2, lam, denom;
};

// The number of blocks that did not finish cleanly.
extern "C" int run_pursuit_loop(int grid, int threads, const LoopArgs* loop_args) {
    const LoopArgs a = *loop_args;
    return emu_launch({(unsigned)grid, 1, 1}, {(unsigned)threads, 1, 1}, [a]() {
        pursuit_loop(a.B, a.err, a.ftype, a.residual, a.T, a.lam_mu, a.lmm, a.mu, a.neighbors, a.xcorr, a.ftemp,
                     a.flags, a.block_count, a.sync, a.st_all, a.ids_all, a.y_all, a.x_all, a.feat_all, a.counts,
                     a.n, a.C, a.K, a.nt0, a.M, a.n_near, a.n_iter, a.capacity, a.thr2, a.lam, a.denom);
    });
}
