// Kernels of spike detection: correlation with short temporal filters, thresholds on PC projections
// (mexThSpkPC.cu) and prototype matching (mexGetSpikes2.cu); their peak finder is matching pursuit's (pursuit.cu).
// Arrays are C-ordered; a batch of traces is x[t * C + c] (time rows). Float arithmetic that the NumPy twin does
// in several rounded steps uses the explicit _rn intrinsics, so that no fused multiply-add changes the rounding.

#define CV_TT 64  // window starts per block of correlate_valid

// out[t, c, f] = sum_i filters[i, f] * x[t + i, c] for t <= n - nt0, 0 beyond.
// Grid (ceil(n / CV_TT), ceil(C / 32)), block (32, 8): 32 channels x 8 row lanes over CV_TT window starts. The
// filters and the tile's samples are staged in dynamic shared memory: nt0 * F + (CV_TT + nt0 - 1) * 32 floats.
extern "C" __global__ void correlate_valid(const float* __restrict__ x, const float* __restrict__ filters,
                                           float* __restrict__ out, const int n, const int C, const int nt0,
                                           const int F)
{
    extern __shared__ float shared[];
    float* fs = shared;
    float* xs = shared + nt0 * F;
    const int lane = threadIdx.x, row = threadIdx.y;
    const int c = blockIdx.y * 32 + lane;
    const int t0 = blockIdx.x * CV_TT;
    const int last = n - nt0;
    for (int i = row * 32 + lane; i < nt0 * F; i += 256) fs[i] = filters[i];
    for (int r = row; r < CV_TT + nt0 - 1; r += 8) {
        const int t = t0 + r;
        xs[r * 32 + lane] = (t < n && c < C) ? x[(size_t)t * C + c] : 0.0f;
    }
    __syncthreads();
    if (c >= C) return;
    for (int tt = row; tt < CV_TT; tt += 8) {
        const int t = t0 + tt;
        if (t >= n) break;
        float* o = out + ((size_t)t * C + c) * F;
        for (int f0 = 0; f0 < F; f0 += 8) {
            float acc[8];
#pragma unroll
            for (int q = 0; q < 8; q++) acc[q] = 0.0f;
            if (t <= last) {
                for (int i = 0; i < nt0; i++) {
                    const float v = xs[(tt + i) * 32 + lane];
                    const float* fi = fs + i * F + f0;
#pragma unroll
                    for (int q = 0; q < 8; q++)
                        if (f0 + q < F) acc[q] = fmaf(fi[q], v, acc[q]);
                }
            }
#pragma unroll
            for (int q = 0; q < 8; q++)
                if (f0 + q < F) o[f0 + q] = acc[q];
        }
    }
}

// norm[i] = sqrt(sum_p proj[i, p]^2), summed in double in p order and rounded to float; one thread per (t, c).
extern "C" __global__ void projection_norm(const float* __restrict__ proj, float* __restrict__ norm,
                                           const long long total, const int P)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    double s = 0.0;
    for (int p = 0; p < P; p++) {
        const double v = (double)proj[i * P + p];
        s = __dadd_rn(s, __dmul_rn(v, v));
    }
    norm[i] = (float)sqrt(s);
}

// wmax[s, c] = max(norm[s : s + nt0, c]) (nothing beyond n; norms are >= 0), zeroed unless > threshold.
extern "C" __global__ void window_max_above(const float* __restrict__ norm, float* __restrict__ wmax, const int n,
                                            const int C, const int nt0, const float threshold)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * C) return;
    const int s = (int)(i / C), c = (int)(i % C);
    const int end = min(n, s + nt0);
    float m = 0.0f;
    for (int t = s; t < end; t++) m = fmaxf(m, norm[(size_t)t * C + c]);
    wmax[i] = m > threshold ? m : 0.0f;
}

// flags[t, c] = 1 where the projection norm peaks (see cpu pc_threshold_spikes): with s = t - nt0min + 1 >= 0 and
// t <= n - nt0, norm[t, c] > wmax[s, c] - 1e-6 (in double: in float the 1e-6 vanishes for norms above 32 and the
// peak, equal to its window's max, would fail), wmax[s, c] > threshold and no neighbour channel iC[c, 1:] has a
// larger wmax at s. One thread per (t, c).
extern "C" __global__ void pc_peak_flags(const float* __restrict__ norm, const float* __restrict__ wmax,
                                         const long long* __restrict__ iC, unsigned char* __restrict__ flags,
                                         const int n, const int C, const int nt0, const int nt0min,
                                         const int n_near, const float threshold)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * C) return;
    const int t = (int)(i / C), c = (int)(i % C);
    const int s = t - nt0min + 1;
    unsigned char f = 0;
    if (s >= 0 && t <= n - nt0) {
        const float win = wmax[(size_t)s * C + c];
        if ((double)norm[i] > __dsub_rn((double)win, 1e-6) && win > threshold) {
            float neighbour = 0.0f;  // wmax >= 0
            for (int j = 1; j < n_near; j++) neighbour = fmaxf(neighbour, wmax[(size_t)s * C + iC[(size_t)c * n_near + j]]);
            f = neighbour <= win;
        }
    }
    flags[i] = f;
}

// Larger value wins; equal values go to the smaller index.
__device__ __forceinline__ void argmax_merge(float& v, int& k, const float v2, const int k2)
{
    if (v2 > v || (v2 == v && k2 < k)) {
        v = v2;
        k = k2;
    }
}

// Block-wide argmax of (v, k) held by each thread; the result is valid in thread 0. blockDim.x multiple of 32.
__device__ __forceinline__ void block_argmax(float& v, int& k)
{
    __shared__ float sv[32];
    __shared__ int sk[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_down_sync(0xffffffffu, v, o);
        const int k2 = __shfl_down_sync(0xffffffffu, k, o);
        argmax_merge(v, k, v2, k2);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) {
        sv[warp] = v;
        sk[warp] = k;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < n_warps ? sv[lane] : -__int_as_float(0x7f800000);
        k = lane < n_warps ? sk[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float v2 = __shfl_down_sync(0xffffffffu, v, o);
            const int k2 = __shfl_down_sync(0xffffffffu, k, o);
            argmax_merge(v, k, v2, k2);
        }
    }
}

#define PS_MAXSUM 32

// Prototype scores (mexGetSpikes2.cu): for channel i, S_r(j) = sum of filtered[t, c, r] over the j + 1 nearest
// channels c of iC[i, :j + 1] and best[t, i] = max over j < n_sum (<= PS_MAXSUM) and r of S_r(j)^2 / (j + 1);
// err[t] = max_i best[t, i] (0 for t > n - nt0) and channel[t] its first argmax. Each S_r(j) is summed afresh in
// ascending channel order, as the NumPy twin's matrix product does: channels whose nearest sets coincide then
// tie exactly, and the argmax goes to the first of them as on the CPU (a running sum in nearest-first order
// would break such ties by rounding). One block per window start t; the row filtered[t] ([C, R]) is staged in
// dynamic shared memory (C * R floats).
extern "C" __global__ void prototype_scores(const float* __restrict__ filtered, const long long* __restrict__ iC,
                                            float* __restrict__ err, long long* __restrict__ channel,
                                            const int n, const int C, const int R, const int n_near,
                                            const int n_sum, const int nt0)
{
    extern __shared__ float row[];
    const int t = blockIdx.x;
    for (int k = threadIdx.x; k < C * R; k += blockDim.x) row[k] = filtered[(size_t)t * C * R + k];
    __syncthreads();
    float bv = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        int sorted[PS_MAXSUM];  // the channels iC[i, :j + 1], ascending
        float best = 0.0f;
        for (int j = 0; j < n_sum; j++) {
            const int ch = (int)iC[(size_t)i * n_near + j];
            int q = j;
            while (q > 0 && sorted[q - 1] > ch) {
                sorted[q] = sorted[q - 1];
                q--;
            }
            sorted[q] = ch;
            float m = 0.0f;  // squares are >= 0
            for (int r = 0; r < R; r++) {
                float s = 0.0f;
                for (int a = 0; a <= j; a++) s = __fadd_rn(s, row[sorted[a] * R + r]);
                m = fmaxf(m, __fmul_rn(s, s));
            }
            best = fmaxf(best, __fdiv_rn(m, (float)(j + 1)));
        }
        argmax_merge(bv, bi, best, i);
    }
    block_argmax(bv, bi);
    if (threadIdx.x == 0) {
        err[t] = t <= n - nt0 ? bv : 0.0f;
        channel[t] = bi;
    }
}

// keep[a] = 0 where a seed of larger height x sits on a channel less than spacing indices away (cleanup_heights).
extern "C" __global__ void cleanup_heights(const long long* __restrict__ channel, const float* __restrict__ x,
                                           unsigned char* __restrict__ keep, const int m, const int spacing)
{
    const int a = blockIdx.x * blockDim.x + threadIdx.x;
    if (a >= m) return;
    const long long ca = channel[a];
    const float xa = x[a];
    bool k = true;
    for (int b = 0; k && b < m; b++) {
        const long long d = channel[b] - ca;
        if ((d < 0 ? -d : d) < spacing && x[b] > xa) k = false;
    }
    keep[a] = k;
}
