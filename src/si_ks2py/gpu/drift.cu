// Kernels of the drift stage (Kilosort 2.5's spikedetector3.cu, sumChannels). Arrays are C-ordered.

#define GA_MAX_R 8  // temporal prototypes
#define GA_MAX_S 8  // spatial footprints

// amp[t, g] = max over r < R, s < S of max(0, sum_{j < J} weights[g, j, s] * filtered[t, iC[g, j], r]), the sum
// over j ascending, where that exceeds threshold (else 0). filtered [n, C, R], iC [G, J], weights [G, J, S]. One thread per (t, g), g fastest: the
// threads of a warp read the same row of filtered, which stays in the cache.
extern "C" __global__ void grid_amplitudes(const float* __restrict__ filtered, const long long* __restrict__ iC,
                                           const float* __restrict__ weights, float* __restrict__ amp, const int n,
                                           const int C, const int R, const int G, const int J, const int S,
                                           const float threshold)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * G) return;
    const int t = (int)(i / G), g = (int)(i % G);
    float acc[GA_MAX_R * GA_MAX_S];
#pragma unroll
    for (int k = 0; k < GA_MAX_R * GA_MAX_S; k++) acc[k] = 0.0f;
    const float* row = filtered + (size_t)t * C * R;
    for (int j = 0; j < J; j++) {
        const float* f = row + (size_t)iC[(size_t)g * J + j] * R;
        const float* w = weights + ((size_t)g * J + j) * S;
        for (int r = 0; r < R; r++) {
            const float v = f[r];
            for (int s = 0; s < S; s++) acc[r * GA_MAX_S + s] = __fadd_rn(acc[r * GA_MAX_S + s], __fmul_rn(w[s], v));
        }
    }
    float best = 0.0f;
    for (int r = 0; r < R; r++)
        for (int s = 0; s < S; s++) best = fmaxf(best, acc[r * GA_MAX_S + s]);
    amp[i] = best > threshold ? best : 0.0f;
}
