// Kernels of spike detection: correlation with short temporal filters, thresholds on PC projections
// (mexThSpkPC.cu) and prototype matching (mexGetSpikes2.cu); their peak finder is matching pursuit's (pursuit.cu).
// Arrays are C-ordered; a batch of traces is x[t * C + c] (time rows). Float arithmetic that the NumPy twin does
// in several rounded steps uses the explicit _rn intrinsics, so that no fused multiply-add changes the rounding.

#define CV_TT 64  // window starts per block of correlate_valid
#define CV_P 8    // consecutive window starts per thread (8 row lanes x CV_P = CV_TT)

// out[t, c, f] = sum_i filters[i, f] * x[t + i, c] for t <= n - nt0, 0 beyond, summed over i ascending.
// Grid (ceil(n / CV_TT), ceil(C / 32)), block (32, 8): 32 channels x 8 row lanes, each lane CV_P consecutive
// window starts and FW filters at a time, so that a filter value read from shared memory serves CV_P sums and
// a sample serves FW. The filters and the tile's samples are staged in dynamic shared memory:
// nt0 * F + (CV_TT + nt0 - 1) * 32 floats.
template <int FW>
__device__ __forceinline__ void correlate_tile(const float* __restrict__ x, const float* __restrict__ filters,
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
    const float* xr = xs + row * CV_P * 32 + lane;
    for (int f0 = 0; f0 < F; f0 += FW) {
        float acc[CV_P][FW];
#pragma unroll
        for (int p = 0; p < CV_P; p++)
#pragma unroll
            for (int q = 0; q < FW; q++) acc[p][q] = 0.0f;
        for (int i = 0; i < nt0; i++) {
            float w[FW];
#pragma unroll
            for (int q = 0; q < FW; q++) w[q] = f0 + q < F ? fs[i * F + f0 + q] : 0.0f;
#pragma unroll
            for (int p = 0; p < CV_P; p++) {
                const float v = xr[(p + i) * 32];
#pragma unroll
                for (int q = 0; q < FW; q++) acc[p][q] = fmaf(w[q], v, acc[p][q]);
            }
        }
#pragma unroll
        for (int p = 0; p < CV_P; p++) {
            const int t = t0 + row * CV_P + p;
            if (t >= n) break;
            float* o = out + ((size_t)t * C + c) * F;
#pragma unroll
            for (int q = 0; q < FW; q++)
                if (f0 + q < F) o[f0 + q] = t <= last ? acc[p][q] : 0.0f;
        }
    }
}

// up to 4 filters (the waveform PCs) and any number, 8 at a time (the prototypes)
extern "C" __global__ void correlate_valid4(const float* __restrict__ x, const float* __restrict__ filters,
                                            float* __restrict__ out, const int n, const int C, const int nt0,
                                            const int F)
{
    correlate_tile<4>(x, filters, out, n, C, nt0, F);
}

extern "C" __global__ void correlate_valid8(const float* __restrict__ x, const float* __restrict__ filters,
                                            float* __restrict__ out, const int n, const int C, const int nt0,
                                            const int F)
{
    correlate_tile<8>(x, filters, out, n, C, nt0, F);
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

#define PS_MAXSUM 8                                   // nearest channels a score sums over, at most
#define PS_ENTRIES (PS_MAXSUM * (PS_MAXSUM + 1) / 2)  // rows of sorted_nearest
#define PS_TILE 4                                     // window starts per block of prototype_scores, at most

// table[(j * (j + 1) / 2 + q) * C + i] = the q-th smallest channel of iC[i, :j + 1], for j < n_sum; one thread per
// channel i.
extern "C" __global__ void sorted_nearest(const long long* __restrict__ iC, int* __restrict__ table, const int C,
                                          const int n_near, const int n_sum)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    int sorted[PS_MAXSUM];
    for (int j = 0; j < n_sum; j++) {
        const int ch = (int)iC[(size_t)i * n_near + j];
        int q = j;
        while (q > 0 && sorted[q - 1] > ch) {
            sorted[q] = sorted[q - 1];
            q--;
        }
        sorted[q] = ch;
        for (q = 0; q <= j; q++) table[(j * (j + 1) / 2 + q) * C + i] = sorted[q];
    }
}

// Prototype scores (mexGetSpikes2.cu): for channel i, S_r(j) = sum of filtered[t, c, r] over the j + 1 nearest
// channels c of iC[i, :j + 1] and best[t, i] = max over j < n_sum (<= PS_MAXSUM) and r of S_r(j)^2 / (j + 1);
// err[t] = max_i best[t, i] (0 for t > n - nt0) and channel[t] its first argmax. Each S_r(j) is summed afresh in
// ascending channel order (the channels from sorted_nearest), as the NumPy twin's matrix product does: channels
// whose nearest sets coincide then tie exactly, and the argmax goes to the first of them as on the CPU (a running
// sum in nearest-first order would break such ties by rounding). One block per `tile` (<= PS_TILE) window starts,
// a thread per channel (looping when C > blockDim.x, a multiple of 32): a thread's sorted channels stay in
// registers for the whole tile. The tile's rows are staged in dynamic shared memory as [tile, R, C + 1] floats
// (channel-contiguous, padded: neighbouring threads read neighbouring banks).
extern "C" __global__ void prototype_scores(const float* __restrict__ filtered, const int* __restrict__ table,
                                            float* __restrict__ err, long long* __restrict__ channel,
                                            const int n, const int C, const int R, const int n_sum,
                                            const int nt0, const int tile)
{
    extern __shared__ float rows[];
    __shared__ float warp_v[PS_TILE][32];
    __shared__ int warp_k[PS_TILE][32];
    const int t0 = blockIdx.x * tile;
    const int Cp = C + 1;
    const int width = C * R;
    for (int e = threadIdx.x; e < tile * width; e += blockDim.x) {
        const int tt = e / width, c = (e % width) / R, r = e % R;
        rows[(tt * R + r) * Cp + c] = t0 + tt < n ? filtered[(size_t)t0 * width + e] : 0.0f;
    }
    __syncthreads();
    float bv[PS_TILE];
    int bi[PS_TILE];
#pragma unroll
    for (int tt = 0; tt < PS_TILE; tt++) {
        bv[tt] = -__int_as_float(0x7f800000);
        bi[tt] = 0x7fffffff;
    }
    const int entries = n_sum * (n_sum + 1) / 2;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        int sc[PS_ENTRIES];
#pragma unroll
        for (int e = 0; e < PS_ENTRIES; e++) sc[e] = e < entries ? table[(size_t)e * C + i] : 0;
#pragma unroll
        for (int tt = 0; tt < PS_TILE; tt++) {
            if (tt >= tile) break;
            float best = 0.0f;
#pragma unroll
            for (int j = 0; j < PS_MAXSUM; j++) {
                if (j >= n_sum) break;
                float m = 0.0f;  // squares are >= 0
                for (int r = 0; r < R; r++) {
                    const float* v = rows + (tt * R + r) * Cp;
                    float s = 0.0f;
#pragma unroll
                    for (int q = 0; q <= j; q++) s = __fadd_rn(s, v[sc[j * (j + 1) / 2 + q]]);
                    m = fmaxf(m, __fmul_rn(s, s));
                }
                best = fmaxf(best, __fdiv_rn(m, (float)(j + 1)));
            }
            argmax_merge(bv[tt], bi[tt], best, i);
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int tt = 0; tt < PS_TILE; tt++) {
        for (int o = 16; o > 0; o >>= 1) {
            const float v2 = __shfl_down_sync(0xffffffffu, bv[tt], o);
            const int k2 = __shfl_down_sync(0xffffffffu, bi[tt], o);
            argmax_merge(bv[tt], bi[tt], v2, k2);
        }
        if (lane == 0) {
            warp_v[tt][warp] = bv[tt];
            warp_k[tt][warp] = bi[tt];
        }
    }
    __syncthreads();
    const int tt = threadIdx.x;
    if (tt < tile && t0 + tt < n) {
        float v = warp_v[tt][0];
        int k = warp_k[tt][0];
        for (int w = 1; w < n_warps; w++) argmax_merge(v, k, warp_v[tt][w], warp_k[tt][w]);
        err[t0 + tt] = t0 + tt <= n - nt0 ? v : 0.0f;
        channel[t0 + tt] = k;
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
