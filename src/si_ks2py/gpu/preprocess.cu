// Kernels of the preprocessing stage. Arrays are C-ordered; a batch of traces is x[t * C + c] (time rows).

// Forward then backward IIR filter along time with zero initial state (gpufilter.m), one thread per channel.
// Direct form II transposed in double precision; b, a hold (ORDER + 1) coefficients with a[0] == 1. The
// recursion is sequential in time and there are few threads (one per channel), so each thread loads TILE samples
// ahead into registers: the loads of a tile are in flight together instead of one memory latency per sample.
template <int ORDER>
__device__ void iir_pass(const float* x, float* y, const double* bb, const double* aa,
                         const int n, const int C, const int c, const bool backward)
{
    constexpr int TILE = 64;
    double z[ORDER + 1];
#pragma unroll
    for (int k = 0; k <= ORDER; k++) z[k] = 0.0;
    for (int t0 = 0; t0 < n; t0 += TILE) {
        float xs[TILE];
#pragma unroll
        for (int j = 0; j < TILE; j++) {
            const int s = t0 + j;
            const int t = backward ? n - 1 - s : s;
            xs[j] = s < n ? x[(size_t)t * C + c] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < TILE; j++) {
            const int s = t0 + j;
            if (s >= n) break;
            const double xt = xs[j];
            const double yt = bb[0] * xt + z[0];
#pragma unroll
            for (int k = 0; k < ORDER - 1; k++) z[k] = bb[k + 1] * xt + z[k + 1] - aa[k + 1] * yt;
            z[ORDER - 1] = bb[ORDER] * xt - aa[ORDER] * yt;
            y[(size_t)(backward ? n - 1 - s : s) * C + c] = (float)yt;
        }
    }
}

template <int ORDER>
__device__ void filtfilt_channel(const float* x, float* y, const double* b, const double* a, const int n,
                                 const int C, const int c)
{
    double bb[ORDER + 1], aa[ORDER + 1];
#pragma unroll
    for (int k = 0; k <= ORDER; k++) { bb[k] = b[k]; aa[k] = a[k]; }
    iir_pass<ORDER>(x, y, bb, aa, n, C, c, false);
    iir_pass<ORDER>(y, y, bb, aa, n, C, c, true);  // in place: each sample is read before it is written
}

extern "C" __global__ void filtfilt_zero_state(const float* __restrict__ x, float* __restrict__ y,
                                               const double* __restrict__ b, const double* __restrict__ a,
                                               const int order, const int n, const int C)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    switch (order) {
        case 1: filtfilt_channel<1>(x, y, b, a, n, C, c); break;
        case 2: filtfilt_channel<2>(x, y, b, a, n, C, c); break;
        case 3: filtfilt_channel<3>(x, y, b, a, n, C, c); break;
        case 4: filtfilt_channel<4>(x, y, b, a, n, C, c); break;
        case 5: filtfilt_channel<5>(x, y, b, a, n, C, c); break;
        case 6: filtfilt_channel<6>(x, y, b, a, n, C, c); break;
    }
}

// Running minimum (+inf beyond the edges, my_min.m) or sum (zero beyond the edges, my_sum.m) over +-hw along
// the middle axis of x viewed as [outer, n, inner]; one thread per output element.
extern "C" __global__ void running_window(const float* __restrict__ x, float* __restrict__ y, const int outer,
                                          const int n, const int inner, const int hw, const int use_min)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)outer * n * inner) return;
    const int in = (int)(i % inner);
    const int t = (int)((i / inner) % n);
    const long long base = (i / ((long long)inner * n)) * n * inner + in;
    const int lo = max(0, t - hw), hi = min(n - 1, t + hw);
    float acc = use_min ? __int_as_float(0x7f800000) : 0.0f;  // +inf
    for (int s = lo; s <= hi; s++) {
        const float v = x[base + (long long)s * inner];
        acc = use_min ? fminf(acc, v) : acc + v;
    }
    y[i] = acc;
}
