// Kernels of the drift stage (Kilosort 2.5's spikedetector3.cu, sumChannels). Arrays are C-ordered.

// amp[t, g] = max over r < R, s < S of max(0, sum_{j < J} weights[g, j, s] * filtered[t, iC[g, j], r]), the sum
// over j ascending, where that exceeds threshold (else 0). filtered [n, C, R], iC [G, J], weights [G, J, S].
// Grid (ceil(n / tile),), block 256: a block stages the rows of `tile` window starts of filtered in dynamic shared
// memory (tile * C * R floats) and each thread takes grid points g = threadIdx.x, + 256, ..., with the
// footprints of g in registers, over the tile's rows. R and S are template constants so that the R * S sums stay
// in registers.
#define GA_MAX_J 16

template <int R, int S>
__device__ __forceinline__ void grid_tile(const float* __restrict__ filtered, const long long* __restrict__ iC,
                                          const float* __restrict__ weights, float* __restrict__ amp, const int n,
                                          const int C, const int G, const int J, const int tile,
                                          const float threshold)
{
    extern __shared__ float rows[];
    const int t0 = blockIdx.x * tile;
    const int n_rows = min(tile, n - t0);
    const size_t row = (size_t)C * R;
    const float* source = filtered + (size_t)t0 * row;
    for (size_t i = threadIdx.x; i < (size_t)n_rows * row; i += blockDim.x) rows[i] = source[i];
    __syncthreads();
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        int offset[GA_MAX_J];
        float w[GA_MAX_J][S];
#pragma unroll
        for (int j = 0; j < GA_MAX_J; j++) {
            if (j < J) {
                offset[j] = (int)iC[(size_t)g * J + j] * R;
#pragma unroll
                for (int s = 0; s < S; s++) w[j][s] = weights[((size_t)g * J + j) * S + s];
            }
        }
        for (int t = 0; t < n_rows; t++) {
            const float* x = rows + (size_t)t * row;
            float acc[R][S];
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int s = 0; s < S; s++) acc[r][s] = 0.0f;
#pragma unroll
            for (int j = 0; j < GA_MAX_J; j++) {
                if (j < J) {
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const float v = x[offset[j] + r];
#pragma unroll
                        for (int s = 0; s < S; s++) acc[r][s] = __fadd_rn(acc[r][s], __fmul_rn(w[j][s], v));
                    }
                }
            }
            float best = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int s = 0; s < S; s++) best = fmaxf(best, acc[r][s]);
            amp[(size_t)(t0 + t) * G + g] = best > threshold ? best : 0.0f;
        }
    }
}

// the drift stage's 6 prototypes x 5 footprint sizes
extern "C" __global__ void grid_amplitudes_6x5(const float* __restrict__ filtered, const long long* __restrict__ iC,
                                               const float* __restrict__ weights, float* __restrict__ amp,
                                               const int n, const int C, const int G, const int J, const int tile,
                                               const float threshold)
{
    grid_tile<6, 5>(filtered, iC, weights, amp, n, C, G, J, tile, threshold);
}
