// Runs the kernels of detect.cu, templates.cu and pursuit.cu's template projections (included by the build as
// kernel.cu) on the host, launched as gpu/ops.py launches them (launch.h: one process per block, one thread per
// CUDA thread).
#include "launch.h"
#include "kernel.cu"

extern "C" int run_correlate_valid(const float* x, const float* filters, float* out, int n, int C, int nt0, int F) {
    const emu_dim grid = {(unsigned)((n + CV_TT - 1) / CV_TT), (unsigned)((C + 31) / 32), 1};
    return emu_launch(grid, {32, 8, 1}, [=]() {
        if (F <= 4) correlate_valid4(x, filters, out, n, C, nt0, F);
        else correlate_valid8(x, filters, out, n, C, nt0, F);
    });
}

extern "C" int run_prototype_scores(const float* filtered, const long long* iC, int* table, float* err,
                                    long long* channel, int n, int C, int R, int n_near, int n_sum, int nt0,
                                    int tile, int threads) {
    const int failed = emu_launch({(unsigned)((C + 127) / 128), 1, 1}, {128, 1, 1},
                                  [=]() { sorted_nearest(iC, table, C, n_near, n_sum); });
    return failed + emu_launch({(unsigned)((n + tile - 1) / tile), 1, 1}, {(unsigned)threads, 1, 1},
                               [=]() { prototype_scores(filtered, table, err, channel, n, C, R, n_sum, nt0, tile); });
}

extern "C" int run_neighbourhood_gram(const double* dWU, const long long* iC, const long long* iW, double* gram,
                                      int K, int nt0, int C, int n_near) {
    return emu_launch({(unsigned)K, 1, 1}, {256, 1, 1},
                      [=]() { neighbourhood_gram(dWU, iC, iW, gram, nt0, C, n_near); });
}

extern "C" int run_align_templates(const double* vectors, const double* dWU, const long long* iC, const long long* iW,
                                   const double* Ka, const double* Kb, double* W, double* U, double* mu, int K,
                                   int nt0, int C, int n_near, int R, int nup, int nt0min, double rank_tolerance) {
    return emu_launch({(unsigned)K, 1, 1}, {128, 1, 1}, [=]() {
        align_templates(vectors, dWU, iC, iW, Ka, Kb, W, U, mu, nt0, C, n_near, R, nup, nt0min, rank_tolerance);
    });
}

extern "C" int run_template_projections(const float* data, const float* U, const float* Wt, int* window, float* B,
                                        int n, int C, int K, int nt0, int R, int starts) {
    const unsigned chunks = (unsigned)((K + PJ_TEMPLATES - 1) / PJ_TEMPLATES);
    const int failed = emu_launch({chunks, 1, 1}, {256, 1, 1}, [=]() { projection_windows(U, window, K, C, R); });
    return failed + emu_launch({(unsigned)((n + 8 * starts - 1) / (8 * starts)), chunks, 1}, {32, 8, 1}, [=]() {
        if (starts == 16) template_projections16(data, U, Wt, window, B, n, C, K, nt0, R);
        else template_projections8(data, U, Wt, window, B, n, C, K, nt0, R);
    });
}

extern "C" int run_grid_amplitudes(const float* filtered, const long long* iC, const float* weights, float* amp,
                                   int n, int C, int G, int J, int tile, int threads, float threshold) {
    return emu_launch({(unsigned)((n + tile - 1) / tile), 1, 1}, {(unsigned)threads, 1, 1},
                      [=]() { grid_amplitudes_6x5(filtered, iC, weights, amp, n, C, G, J, tile, threshold); });
}
