// Kernels of the preprocessing stage. Arrays are C-ordered; a batch of traces is x[t * C + c] (time rows).

// IIR filtering along time with zero initial state (one pass of gpufilter.m's filtfilt), block-parallel over time.
// Direct form II transposed in double precision; b, a hold (order + 1) coefficients with a[0] == 1. The recursion
// is linear in its state z, so the samples are cut into segments of L: iir_segments filters every (segment,
// channel) from a zero state in parallel, iir_carry runs the true state across the segments of each channel
// (z_start[j] = z_end0[j-1] + Phi z_start[j-1], Phi the state after L zero-input steps), and iir_correct adds the
// zero-input response to that state, y[t] += sum_k z_start[j][k] h_k(t - jL). A backward pass runs on reversed
// time (segments counted from the end). Arrays: x, y [n, C] float32; z_end, z_start [n_seg, C, order] double;
// h [order, L] and phi [order, order] double (Phi[i][k]: state i after L steps from the unit state k).
template <int ORDER>
__device__ void iir_segment(const float* x, float* y, const double* b, const double* a, double* z_end,
                            const int n, const int C, const int L, const int seg, const int c, const bool backward)
{
    double bb[ORDER + 1], aa[ORDER + 1], z[ORDER];
#pragma unroll
    for (int k = 0; k <= ORDER; k++) { bb[k] = b[k]; aa[k] = a[k]; }
#pragma unroll
    for (int k = 0; k < ORDER; k++) z[k] = 0.0;
    const int s1 = min(n, (seg + 1) * L);
    for (int s = seg * L; s < s1; s++) {
        const size_t i = (size_t)(backward ? n - 1 - s : s) * C + c;
        const double xt = x[i];
        const double yt = bb[0] * xt + z[0];
#pragma unroll
        for (int k = 0; k < ORDER - 1; k++) z[k] = bb[k + 1] * xt + z[k + 1] - aa[k + 1] * yt;
        z[ORDER - 1] = bb[ORDER] * xt - aa[ORDER] * yt;
        y[i] = (float)yt;  // in place is safe: sample i is read before it is written, by this thread only
    }
#pragma unroll
    for (int k = 0; k < ORDER; k++) z_end[((size_t)seg * C + c) * ORDER + k] = z[k];
}

extern "C" __global__ void iir_segments(const float* x, float* y, const double* __restrict__ b,
                                        const double* __restrict__ a, double* __restrict__ z_end, const int order,
                                        const int n, const int C, const int L, const int backward)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // channel fastest: coalesced rows
    const int n_seg = (n + L - 1) / L;
    if (i >= (long long)n_seg * C) return;
    const int c = (int)(i % C), seg = (int)(i / C);
    switch (order) {
        case 1: iir_segment<1>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
        case 2: iir_segment<2>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
        case 3: iir_segment<3>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
        case 4: iir_segment<4>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
        case 5: iir_segment<5>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
        case 6: iir_segment<6>(x, y, b, a, z_end, n, C, L, seg, c, backward); break;
    }
}

extern "C" __global__ void iir_carry(const double* __restrict__ z_end, const double* __restrict__ phi,
                                     double* __restrict__ z_start, const int order, const int n_seg, const int C)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double z[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int seg = 0; seg < n_seg; seg++) {
        double* out = z_start + ((size_t)seg * C + c) * order;
        for (int k = 0; k < order; k++) out[k] = z[k];
        if (seg + 1 == n_seg) break;
        const double* end0 = z_end + ((size_t)seg * C + c) * order;
        double next[6];
        for (int i = 0; i < order; i++) {
            double v = end0[i];
            for (int k = 0; k < order; k++) v += phi[i * order + k] * z[k];
            next[i] = v;
        }
        for (int k = 0; k < order; k++) z[k] = next[k];
    }
}

extern "C" __global__ void iir_correct(float* __restrict__ y, const double* __restrict__ z_start,
                                       const double* __restrict__ h, const int order, const int n, const int C,
                                       const int L, const int backward)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * C) return;
    const int c = (int)(i % C), t = (int)(i / C);
    const int s = backward ? n - 1 - t : t;
    const int seg = s / L, offset = s % L;
    if (seg == 0) return;  // the first segment starts from the true (zero) state
    const double* z = z_start + ((size_t)seg * C + c) * order;
    double v = y[i];
    for (int k = 0; k < order; k++) v += z[k] * h[k * L + offset];
    y[i] = (float)v;
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

// Median of each row of x [n, C] (the common median reference): one block per row sorts the row in shared memory
// with a bitonic network over P (a power of two >= C) values, padded with +inf; for an even C the mean of the two
// middle values, as NumPy's median. med: [n].
extern "C" __global__ void row_median(const float* __restrict__ x, float* __restrict__ med, const int C, const int P)
{
    extern __shared__ float v[];
    const float* row = x + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < P; i += blockDim.x) v[i] = i < C ? row[i] : __int_as_float(0x7f800000);
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int pair = threadIdx.x; pair < P / 2; pair += blockDim.x) {
                const int i = 2 * j * (pair / j) + pair % j;  // the lower index of a pair at distance j
                const float a = v[i], b = v[i + j];
                if ((a > b) == ((i & k) == 0)) { v[i] = b; v[i + j] = a; }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) med[blockIdx.x] = (C & 1) ? v[C / 2] : 0.5f * (v[C / 2 - 1] + v[C / 2]);
}

// Sums over time of each channel of x [n, C] float32 (time rows), without cuBLAS, whose first matrix product in a
// process takes 0.1 to 0.5 s to load. column_partial_sums adds each channel over one slab of `rows` samples
// (threads on consecutive channels: coalesced rows) into partial [n_slabs, C]; column_total adds each channel's
// partial sums in slab order, so that the result does not depend on scheduling.
extern "C" __global__ void column_partial_sums(const float* __restrict__ x, float* __restrict__ partial,
                                               const int n, const int C, const int rows)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int t1 = min(n, (blockIdx.y + 1) * rows);
    float sum = 0.0f;
    for (int t = blockIdx.y * rows; t < t1; t++) sum += x[(size_t)t * C + c];
    partial[(size_t)blockIdx.y * C + c] = sum;
}

extern "C" __global__ void column_total(const float* __restrict__ partial, float* __restrict__ total,
                                        const int n_slabs, const int C)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = 0.0f;
    for (int s = 0; s < n_slabs; s++) sum += partial[(size_t)s * C + c];
    total[c] = sum;
}
