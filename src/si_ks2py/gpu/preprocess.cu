// Kernels of the preprocessing stage. Arrays are C-ordered; a batch of traces is x[t * C + c] (time rows).

// Forward then backward IIR filter along time with zero initial state (gpufilter.m), one thread per channel.
// Direct form II transposed in double precision; b, a hold (order + 1) coefficients with a[0] == 1.
extern "C" __global__ void filtfilt_zero_state(const float* __restrict__ x, float* __restrict__ y,
                                               const double* __restrict__ b, const double* __restrict__ a,
                                               const int order, const int n, const int C)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double bb[7], aa[7], z[7];
    for (int k = 0; k <= order; k++) { bb[k] = b[k]; aa[k] = a[k]; z[k] = 0.0; }

    for (int t = 0; t < n; t++) {
        const double xt = x[(size_t)t * C + c];
        const double yt = bb[0] * xt + z[0];
        for (int k = 0; k < order - 1; k++) z[k] = bb[k + 1] * xt + z[k + 1] - aa[k + 1] * yt;
        z[order - 1] = bb[order] * xt - aa[order] * yt;
        y[(size_t)t * C + c] = (float)yt;
    }
    for (int k = 0; k <= order; k++) z[k] = 0.0;
    for (int t = n - 1; t >= 0; t--) {
        const double xt = y[(size_t)t * C + c];
        const double yt = bb[0] * xt + z[0];
        for (int k = 0; k < order - 1; k++) z[k] = bb[k + 1] * xt + z[k + 1] - aa[k + 1] * yt;
        z[order - 1] = bb[order] * xt - aa[order] * yt;
        y[(size_t)t * C + c] = (float)yt;
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
