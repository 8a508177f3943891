// Kernels of template matching pursuit (mexMPnu8.cu) and of the per-spike accumulations that follow it.
// Arrays are C-ordered: a batch is x[t * C + c]; projections B[t * K + k]; W [K, nt0, R]; U [K, C, R];
// dense templates T [K, nt0, C]. Float arithmetic that the NumPy twin does in several rounded steps uses the
// explicit _rn intrinsics, so that no fused multiply-add changes the rounding.

// T[k, i, c] = sum_r W[k, i, r] * U[k, c, r] in float, r ascending; one thread per element.
__device__ __forceinline__ float template_value(const float* __restrict__ W, const float* __restrict__ U,
                                                const int k, const int i, const int c, const int nt0,
                                                const int C, const int R)
{
    float acc = 0.0f;
    for (int r = 0; r < R; r++)
        acc = __fadd_rn(acc, __fmul_rn(W[((size_t)k * nt0 + i) * R + r], U[((size_t)k * C + c) * R + r]));
    return acc;
}

extern "C" __global__ void dense_templates(const float* __restrict__ W, const float* __restrict__ U,
                                           float* __restrict__ T, const int K, const int nt0, const int C,
                                           const int R)
{
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)K * nt0 * C) return;
    const int c = (int)(e % C), i = (int)((e / C) % nt0), k = (int)(e / ((long long)C * nt0));
    T[e] = template_value(W, U, k, i, c, nt0, C, R);
}

#define PJ_TEMPLATES 32  // templates of a chunk (one per lane)
#define PJ_SLAB 32       // channels of the batch staged at a time (read four at a time, as float4)
#define PJ_MAX_RANK 4   // largest rank projections_of_rank dispatches

// Channel window of each chunk of PJ_TEMPLATES templates: window[2j] and window[2j + 1] are the first and the last
// channel where a template of chunk j has a non-zero spatial factor (C and -1 for a chunk without any). Templates
// sorted by peak channel have factors on their neighbourhoods only, so a chunk's window is a few tens of channels.
// Grid (ceil(K / PJ_TEMPLATES)), block 256.
extern "C" __global__ void projection_windows(const float* __restrict__ U, int* __restrict__ window, const int K,
                                              const int C, const int R)
{
    __shared__ int lo_part[32], hi_part[32];
    const int k0 = blockIdx.x * PJ_TEMPLATES;
    const long long count = (long long)min(PJ_TEMPLATES, K - k0) * C * R;
    const float* u = U + (size_t)k0 * C * R;
    int lo = C, hi = -1;
    for (long long e = threadIdx.x; e < count; e += blockDim.x)
        if (u[e] != 0.0f) {
            const int c = (int)((e / R) % C);
            lo = min(lo, c);
            hi = max(hi, c);
        }
    for (int o = 16; o > 0; o >>= 1) {
        lo = min(lo, __shfl_down_sync(0xffffffffu, lo, o));
        hi = max(hi, __shfl_down_sync(0xffffffffu, hi, o));
    }
    if ((threadIdx.x & 31) == 0) {
        lo_part[threadIdx.x >> 5] = lo;
        hi_part[threadIdx.x >> 5] = hi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            lo = min(lo, lo_part[w]);
            hi = max(hi, hi_part[w]);
        }
        window[2 * blockIdx.x] = lo;
        window[2 * blockIdx.x + 1] = hi;
    }
}

// B[t, k] = <T_k, data[t:t+nt0]> = sum_i sum_r Wt[i, r, k] * P[t + i, k, r], where P[s, k, r] = sum_c data[s, c]
// U[k, c, r] (the spatial projections), for window starts t <= n - nt0, 0 beyond. Wt [nt0, R, K] holds the
// temporal factors. Grid (ceil(n / tile), ceil(K / PJ_TEMPLATES)), block (32, 8), tile = 8 * STARTS: a lane per
// template of the chunk, 8 row lanes. A block first sums P for the tile's rows = tile + taps - 1 rows (taps: nt0
// rounded up to a multiple of STARTS) over its chunk's channel window only (from projection_windows), PJ_SLAB
// channels of the batch and of U staged at a time, channels ascending, four channels per shared-memory read; P
// stays in shared memory. The temporal sum then gives each thread STARTS consecutive window starts: per block of
// STARTS taps it holds those taps of W and the 2 STARTS - 1 rows of P they meet in registers (STARTS^2 products
// for 3 STARTS - 1 loads).
// Dynamic shared memory (floats): rows * 32 R (P) + 4 (STARTS + 8) * PJ_SLAB (the slab) + 32 (PJ_SLAB R + 4) (U).
template <int RANK, int STARTS>
__device__ __forceinline__ void projections_of_chunk(const float* __restrict__ data, const float* __restrict__ U,
                                                     const float* __restrict__ Wt, const int* __restrict__ window,
                                                     float* __restrict__ B, const int n, const int C, const int K,
                                                     const int nt0, float* staged)
{
    constexpr int TILE = 8 * STARTS, WIDTH = PJ_TEMPLATES * RANK, USTRIDE = PJ_SLAB * RANK + 4;
    constexpr int ROWS = (STARTS + 8) / 2;  // rows of P a thread sums per pass: two passes when nt0 <= 64
    const int taps = (nt0 + STARTS - 1) / STARTS * STARTS, rows = TILE + taps - 1;
    float* P = staged;                           // [rows, 32 R]
    float* slab = P + rows * WIDTH;              // [8 ROWS, PJ_SLAB]: channels c0 .. c0 + PJ_SLAB - 1 of the batch
    float* factors = slab + 8 * ROWS * PJ_SLAB;  // [32, USTRIDE]: U of the chunk on those channels (16-byte rows)
    const int lane = threadIdx.x, row = threadIdx.y, tid = row * 32 + lane;
    const int t0 = blockIdx.x * TILE, k0 = blockIdx.y * PJ_TEMPLATES;
    const int kc = min(PJ_TEMPLATES, K - k0);
    const int lo = window[2 * blockIdx.y], hi = window[2 * blockIdx.y + 1];
    for (int g = 0; g < rows; g += 8 * ROWS) {
        float acc[ROWS][RANK];
#pragma unroll
        for (int q = 0; q < ROWS; q++)
#pragma unroll
            for (int r = 0; r < RANK; r++) acc[q][r] = 0.0f;
        for (int c0 = lo; c0 <= hi; c0 += PJ_SLAB) {
            __syncthreads();
            for (int e = tid; e < 8 * ROWS * PJ_SLAB; e += 256) {
                const int s = g + e / PJ_SLAB, c = c0 + e % PJ_SLAB;
                slab[e] = (s < rows && t0 + s < n && c <= hi) ? data[(size_t)(t0 + s) * C + c] : 0.0f;
            }
            for (int e = tid; e < PJ_TEMPLATES * PJ_SLAB * RANK; e += 256) {
                const int kl = e / (PJ_SLAB * RANK), q = e % (PJ_SLAB * RANK), c = c0 + q / RANK;
                factors[kl * USTRIDE + q] = (kl < kc && c <= hi) ? U[((size_t)(k0 + kl) * C + c) * RANK + q % RANK]
                                                                 : 0.0f;
            }
            __syncthreads();
            const int span = min(PJ_SLAB, hi + 1 - c0);  // staged channels beyond hi are 0
            for (int j = 0; j < span; j += 4) {
                float u[4 * RANK];  // channels j .. j + 3, every rank
                const float4* fu = reinterpret_cast<const float4*>(factors + lane * USTRIDE + j * RANK);
#pragma unroll
                for (int v = 0; v < RANK; v++) {
                    const float4 x = fu[v];
                    u[4 * v] = x.x;
                    u[4 * v + 1] = x.y;
                    u[4 * v + 2] = x.z;
                    u[4 * v + 3] = x.w;
                }
#pragma unroll
                for (int q = 0; q < ROWS; q++) {
                    const float4 d = *reinterpret_cast<const float4*>(slab + (row + 8 * q) * PJ_SLAB + j);
#pragma unroll
                    for (int r = 0; r < RANK; r++) {
                        acc[q][r] = fmaf(d.x, u[r], acc[q][r]);
                        acc[q][r] = fmaf(d.y, u[RANK + r], acc[q][r]);
                        acc[q][r] = fmaf(d.z, u[2 * RANK + r], acc[q][r]);
                        acc[q][r] = fmaf(d.w, u[3 * RANK + r], acc[q][r]);
                    }
                }
            }
        }
#pragma unroll
        for (int q = 0; q < ROWS; q++) {
            const int s = g + row + 8 * q;
            if (s < rows)
#pragma unroll
                for (int r = 0; r < RANK; r++) P[s * WIDTH + lane * RANK + r] = acc[q][r];
        }
    }
    __syncthreads();
    if (lane >= kc) return;
    const int k = k0 + lane, first = row * STARTS;  // the thread's first window start, from t0
    float acc[STARTS];
#pragma unroll
    for (int q = 0; q < STARTS; q++) acc[q] = 0.0f;
#pragma unroll 1
    for (int i0 = 0; i0 < taps; i0 += STARTS) {
#pragma unroll
        for (int r = 0; r < RANK; r++) {
            float w[STARTS], p[2 * STARTS - 1];
#pragma unroll
            for (int j = 0; j < STARTS; j++) w[j] = i0 + j < nt0 ? Wt[((size_t)(i0 + j) * RANK + r) * K + k] : 0.0f;
            const float* column = P + (first + i0) * WIDTH + lane * RANK + r;
#pragma unroll
            for (int m = 0; m < 2 * STARTS - 1; m++) p[m] = column[m * WIDTH];
#pragma unroll
            for (int j = 0; j < STARTS; j++)
#pragma unroll
                for (int q = 0; q < STARTS; q++) acc[q] = fmaf(w[j], p[j + q], acc[q]);
        }
    }
#pragma unroll
    for (int q = 0; q < STARTS; q++) {
        const int t = t0 + first + q;
        if (t < n) B[(size_t)t * K + k] = t <= n - nt0 ? acc[q] : 0.0f;
    }
}

template <int STARTS>
__device__ __forceinline__ void projections_of_rank(const float* data, const float* U, const float* Wt,
                                                    const int* window, float* B, const int n, const int C,
                                                    const int K, const int nt0, const int R)
{
    extern __shared__ float4 staged4[];  // 16-byte aligned
    float* staged = reinterpret_cast<float*>(staged4);
    switch (R) {
        case 1: projections_of_chunk<1, STARTS>(data, U, Wt, window, B, n, C, K, nt0, staged); break;
        case 2: projections_of_chunk<2, STARTS>(data, U, Wt, window, B, n, C, K, nt0, staged); break;
        case 3: projections_of_chunk<3, STARTS>(data, U, Wt, window, B, n, C, K, nt0, staged); break;
        default: projections_of_chunk<PJ_MAX_RANK, STARTS>(data, U, Wt, window, B, n, C, K, nt0, staged); break;
    }
}

// template_projections16 (tile 128) where the GPU's shared memory allows, template_projections8 (tile 64) otherwise.
extern "C" __global__ void __launch_bounds__(256, 2) template_projections16(
    const float* __restrict__ data, const float* __restrict__ U, const float* __restrict__ Wt,
    const int* __restrict__ window, float* __restrict__ B, const int n, const int C, const int K, const int nt0,
    const int R)
{
    projections_of_rank<16>(data, U, Wt, window, B, n, C, K, nt0, R);
}

extern "C" __global__ void __launch_bounds__(256, 2) template_projections8(
    const float* __restrict__ data, const float* __restrict__ U, const float* __restrict__ Wt,
    const int* __restrict__ window, float* __restrict__ B, const int n, const int C, const int K, const int nt0,
    const int R)
{
    projections_of_rank<8>(data, U, Wt, window, B, n, C, K, nt0, R);
}

// Cost of row t, computed by one warp: C[t, k] = (max(B, 0) + lam_mu_k)^2 / denom - lmm_k (lmm = lam_mu * mu);
// err[t] = max(0, max_k C[t, k]), ftype[t] = first argmax.
__device__ __forceinline__ void cost_row(const float* B, const float* __restrict__ lam_mu,
                                         const float* __restrict__ lmm, float* err, int* ftype, const long long t,
                                         const int K, const float denom)
{
    const int lane = threadIdx.x & 31;
    float bv = -__int_as_float(0x7f800000);
    int bk = 0x7fffffff;
    const float* b = B + t * K;
    for (int k = lane; k < K; k += 32) {
        const float a = __fadd_rn(fmaxf(b[k], 0.0f), lam_mu[k]);
        const float c = __fsub_rn(__fdiv_rn(__fmul_rn(a, a), denom), lmm[k]);
        if (c > bv) {
            bv = c;
            bk = k;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_down_sync(0xffffffffu, bv, o);
        const int k2 = __shfl_down_sync(0xffffffffu, bk, o);
        if (v2 > bv || (v2 == bv && k2 < bk)) {
            bv = v2;
            bk = k2;
        }
    }
    if (lane == 0) {
        err[t] = fmaxf(bv, 0.0f);
        ftype[t] = bk < K ? bk : 0;  // (only NaN costs leave no argmax)
    }
}

// Cost of every row t <= last; one warp per row.
extern "C" __global__ void cost_all(const float* __restrict__ B, const float* __restrict__ lam_mu,
                                    const float* __restrict__ lmm, float* __restrict__ err, int* __restrict__ ftype,
                                    const int last, const int K, const float denom)
{
    const long long t = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t > last) return;
    cost_row(B, lam_mu, lmm, err, ftype, t, K, denom);
}

// flags[t] = 1 where err[t] > thr2 and err[t] is a local maximum (see cpu _peaks): err[t] > err[s] for s in
// [t - L, t) and err[t] >= err[s] for s in (t, t + L]. So peaks are more than L samples apart.
__device__ __forceinline__ bool is_peak(const float* err, const int t, const int n, const int L, const float thr2)
{
    const float e = err[t];
    bool f = e > thr2;
    for (int s = max(0, t - L); f && s < t; s++) f = e > err[s];
    const int hi = min(n - 1, t + L);
    for (int s = t + 1; f && s <= hi; s++) f = e >= err[s];
    return f;
}

// One thread per sample.
extern "C" __global__ void peak_flags(const float* __restrict__ err, unsigned char* __restrict__ flags, const int n,
                                      const int L, const float thr2)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) flags[t] = is_peak(err, t, n, L, thr2);
}

// ---- the whole pursuit of one batch in one launch -------------------------------------------------------------
// pursuit_loop runs every iteration of mexMPnu8's loop as phases separated by a barrier of the whole grid, with
// one block per SM (so that every block is resident and the barrier cannot wait for a block that never starts).
// Arrays written during the launch are read through plain pointers (no __restrict__, no read-only cache).

#define LOOP_THREADS 1024
#define LOOP_WARPS (LOOP_THREADS / 32)

// Every block of the grid waits here for the others. As in cooperative groups' grid sync: thread 0 of each block
// arrives on a counter; the last to arrive resets it and advances the epoch that the others wait on; the fences
// make each block's writes before the barrier visible to every block after it.
__device__ __forceinline__ void grid_barrier(unsigned int* arrived, volatile unsigned int* epoch)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int seen = *epoch;
        __threadfence();
        if (atomicAdd(arrived, 1u) == gridDim.x - 1) {
            atomicExch(arrived, 0u);
            __threadfence();
            atomicAdd((unsigned int*)epoch, 1u);
        } else {
            while (*epoch == seen) {
#if __CUDA_ARCH__ >= 700
                __nanosleep(32);
#endif
            }
        }
        __threadfence();
    }
    __syncthreads();
}

// Exclusive prefix sum of one value per thread over the block (blockDim.x == LOOP_THREADS <= 1024); *total gets
// the sum.
__device__ __forceinline__ int block_exclusive_scan(const int v, int* total)
{
    __shared__ int warp_sums[LOOP_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inclusive = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += u;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int w = lane < LOOP_WARPS ? warp_sums[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            const int u = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += u;
        }
        if (lane < LOOP_WARPS) warp_sums[lane] = w;  // inclusive over the warps
    }
    __syncthreads();
    const int exclusive = inclusive - v + (warp ? warp_sums[warp - 1] : 0);
    *total = warp_sums[LOOP_WARPS - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return exclusive;
}

// Iteration `it` writes its spikes to st/ids/y/x[it * capacity + s] (s < counts[it], time order) and their template
// features to feat[(it * capacity + s) * n_near + q]; the loop ends after n_iter iterations or at the first that
// finds no spike. Per iteration: (1) each block flags the peaks among its rows of err and counts them; (2) each
// block writes its rows' spikes after those of the blocks before it (template, amplitude, score), and their
// features from B at detection; (3) the residual loses each spike's template, and B is updated around the even
// spikes, then (4) around the odd ones (spikes of one parity are >= 2 * nt0 apart, so their windows are
// disjoint); (5) the cost of the rows around each spike is recomputed. flags [n] uint8, block_count [grid] int32
// and sync [2] uint32 (zeros) are scratch space.
extern "C" __global__ void __launch_bounds__(LOOP_THREADS, 1)
pursuit_loop(float* B, float* err, int* ftype, float* residual, const float* __restrict__ T,
             const float* __restrict__ lam_mu, const float* __restrict__ lmm, const float* __restrict__ mu,
             const long long* __restrict__ neighbors, const float* __restrict__ xcorr,
             const long long* __restrict__ ftemp, unsigned char* flags, int* block_count, unsigned int* sync,
             long long* st_all, long long* ids_all, float* y_all, float* x_all, float* feat_all, int* counts,
             const int n, const int C, const int K, const int nt0, const int M, const int n_near, const int n_iter,
             const int capacity, const float thr2, const float lam, const float denom)
{
    __shared__ int block_offset, spike_total;
    const int L = nt0 - 1, last = n - nt0, J = 2 * nt0 - 1;
    const int G = gridDim.x, b = blockIdx.x, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int rows = (n + G - 1) / G;
    const int row0 = min(n, b * rows), row1 = min(n, row0 + rows);
    for (int it = 0; it < n_iter; it++) {
        long long* st = st_all + (size_t)it * capacity;
        long long* ids = ids_all + (size_t)it * capacity;
        float* y = y_all + (size_t)it * capacity;
        float* x = x_all + (size_t)it * capacity;
        float* feat = feat_all + (size_t)it * capacity * n_near;

        // (1) peaks
        int mine = 0;
        for (int t = row0 + tid; t < row1; t += LOOP_THREADS) {
            const unsigned char f = is_peak(err, t, n, L, thr2);
            flags[t] = f;
            mine += f;
        }
        int block_total;
        block_exclusive_scan(mine, &block_total);
        if (tid == 0) block_count[b] = block_total;
        grid_barrier(sync, sync + 1);

        // (2) spikes in time order: this block's after those of the blocks before it
        if (warp == 0) {
            int before = 0, all = 0;
            for (int q = lane; q < G; q += 32) {
                const int c = block_count[q];
                all += c;
                if (q < b) before += c;
            }
            for (int o = 16; o > 0; o >>= 1) {
                before += __shfl_down_sync(0xffffffffu, before, o);
                all += __shfl_down_sync(0xffffffffu, all, o);
            }
            if (lane == 0) {
                block_offset = before;
                spike_total = min(all, capacity);
            }
        }
        __syncthreads();
        const int total = spike_total, first = block_offset;
        if (b == 0 && tid == 0) counts[it] = total;
        if (total == 0) break;  // the same decision in every block: all read the same block counts
        int position = first;
        for (int base = row0; base < row1; base += LOOP_THREADS) {
            const int t = base + tid;
            const int f = t < row1 ? flags[t] : 0;
            int chunk;
            const int p = position + block_exclusive_scan(f, &chunk);
            if (f && p < capacity) {
                const int k = ftype[t];
                st[p] = t;
                ids[p] = k;
                y[p] = B[(size_t)t * K + k];
                x[p] = __fsqrt_rn(err[t]);
            }
            position += chunk;
        }
        __syncthreads();
        // template features (extractFEAT): for f = ftemp[ids[s], q],
        // feat[s, q] = max(0, max_{tau in [-3, 2]} (B[clip(st + tau, 0, last), f] + lam / mu_f) / sqrt(1 + lam / mu_f^2))
        const int own = min(position, capacity) - first;
        for (int e = tid; e < own * n_near; e += LOOP_THREADS) {
            const int s = first + e / n_near, q = e % n_near;
            const long long f = ftemp[ids[s] * n_near + q];
            const float m = mu[f];
            const float shift = __fdiv_rn(lam, m);
            const float scale = __fsqrt_rn(__fadd_rn(1.0f, __fdiv_rn(lam, __fmul_rn(m, m))));
            float best = -__int_as_float(0x7f800000);
            for (int tau = -3; tau < 3; tau++) {
                long long t = st[s] + tau;
                t = t < 0 ? 0 : (t > last ? last : t);
                best = fmaxf(best, __fdiv_rn(__fadd_rn(B[t * K + f], shift), scale));
            }
            feat[(size_t)s * n_near + q] = fmaxf(0.0f, best);
        }
        grid_barrier(sync, sync + 1);

        // (3) residual[st + i, c] -= y * T[id, i, c]; then (3, 4) B[st + j - (nt0 - 1), nb] -= y * xcorr[id, m, j]
        // for nb = neighbors[id, m] < K and rows within [0, last]
        for (int s = b; s < total; s += G) {
            const float* tk = T + (size_t)ids[s] * nt0 * C;
            float* r = residual + (size_t)st[s] * C;
            const float ys = y[s];
            for (int e = tid; e < nt0 * C; e += LOOP_THREADS) r[e] = __fsub_rn(r[e], __fmul_rn(ys, tk[e]));
        }
        for (int parity = 0; parity < 2; parity++) {
            for (int s = 2 * b + parity; s < total; s += 2 * G) {
                const long long id = ids[s];
                const long long t0 = st[s] - L;
                const float ys = y[s];
                const long long* nb = neighbors + id * M;
                const float* xc = xcorr + id * M * J;
                for (int e = tid; e < M * J; e += LOOP_THREADS) {
                    const int j = e / M, m = e % M;  // m fastest: neighbouring templates are adjacent columns of B
                    const long long k = nb[m];
                    const long long t = t0 + j;
                    if (k >= K || k < 0 || t < 0 || t > last) continue;
                    float* bk = B + t * K + k;
                    *bk = __fsub_rn(*bk, __fmul_rn(ys, xc[(size_t)m * J + j]));
                }
            }
            grid_barrier(sync, sync + 1);
        }

        // (5) cost of the rows st[s] - L .. st[s] + L within [0, last], one warp per row (rows shared by two spikes
        // are computed twice from the same B, with the same result)
        for (long long w = (long long)b * LOOP_WARPS + warp; w < (long long)total * (2 * L + 1);
             w += (long long)G * LOOP_WARPS) {
            const long long t = st[w / (2 * L + 1)] - L + w % (2 * L + 1);
            if (t >= 0 && t <= last) cost_row(B, lam_mu, lmm, err, ftype, t, K, denom);
        }
        grid_barrier(sync, sync + 1);
    }
}

// dwu[k, i, c] = sum over the spikes of template k (in the given order, starts[k] .. starts[k + 1]) of
// residual[st + i, c] in double, plus (sum of their y) * T[k, i, c]; one thread per element, no atomics.
extern "C" __global__ void accumulate_templates(const float* __restrict__ residual, const long long* __restrict__ st,
                                                const float* __restrict__ y, const long long* __restrict__ starts,
                                                const float* __restrict__ W, const float* __restrict__ U,
                                                double* __restrict__ dwu, const int K, const int nt0, const int C,
                                                const int R)
{
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)K * nt0 * C) return;
    const int c = (int)(e % C), i = (int)((e / C) % nt0), k = (int)(e / ((long long)C * nt0));
    double acc = 0.0, amplitude = 0.0;
    const long long end = starts[k + 1];
    for (long long s = starts[k]; s < end; s++) {
        acc = __dadd_rn(acc, (double)residual[(size_t)(st[s] + i) * C + c]);
        amplitude = __dadd_rn(amplitude, (double)y[s]);
    }
    const double tv = (double)template_value(W, U, k, i, c, nt0, C, R);
    dwu[e] = __dadd_rn(acc, __dmul_rn(amplitude, tv));
}

#define PC_MAXP 16

// out[s, p, j] = sum_t residual[st + t, ch_j] * wPCA[t, p] + y * own[id, p, j] with ch = channels[id];
// one thread per (spike, j), P <= PC_MAXP.
extern "C" __global__ void pc_features(const float* __restrict__ residual, const long long* __restrict__ st,
                                       const long long* __restrict__ ids, const float* __restrict__ y,
                                       const long long* __restrict__ channels, const float* __restrict__ wPCA,
                                       const float* __restrict__ own, float* __restrict__ out, const int n_spikes,
                                       const int nt0, const int C, const int P, const int J)
{
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)n_spikes * J) return;
    const long long s = e / J;
    const int j = (int)(e % J);
    const long long id = ids[s];
    const long long ch = channels[id * J + j];
    const float* r = residual + (size_t)st[s] * C + ch;
    float acc[PC_MAXP];
#pragma unroll
    for (int p = 0; p < PC_MAXP; p++) acc[p] = 0.0f;
    for (int t = 0; t < nt0; t++) {
        const float v = r[(size_t)t * C];
#pragma unroll
        for (int p = 0; p < PC_MAXP; p++)
            if (p < P) acc[p] = __fadd_rn(acc[p], __fmul_rn(v, wPCA[t * P + p]));
    }
    const float ys = y[s];
#pragma unroll
    for (int p = 0; p < PC_MAXP; p++)
        if (p < P) out[(s * P + p) * J + j] = __fadd_rn(acc[p], __fmul_rn(ys, own[(id * P + p) * J + j]));
}

// Correlation of template a with each neighbour b = neighbors[a, m] at every lag (mexWtW2.cu, the NumPy twin's
// template_xcorr): X[a, m, j] = sum_t sum_{r,q} W[a, t, r] W[b, t - d, q] (U_a' U_b)[r, q] with d = j - (nt0 - 1),
// zero for padding (b == K). One block per (a, m): the R x R spatial product by a block reduction over channels,
// then one thread per lag; double accumulation. V [nt0 * R] and the reduction buffer in shared memory.
#define XC_THREADS 128
#define XC_MAX_RANK 8
extern "C" __global__ void neighbor_xcorr(const float* __restrict__ W, const float* __restrict__ U,
                                          const long long* __restrict__ neighbors, float* __restrict__ X,
                                          const int K, const int M, const int nt0, const int C, const int R)
{
    __shared__ double part[XC_THREADS];
    __shared__ double uu[XC_MAX_RANK * XC_MAX_RANK];
    extern __shared__ double v[];  // [nt0, R]: V[t, q] = sum_r W[a, t, r] uu[r, q]
    const int a = blockIdx.x / M;
    const long long b = neighbors[blockIdx.x];
    const int L = 2 * nt0 - 1;
    float* out = X + (size_t)blockIdx.x * L;
    if (b >= K) {
        for (int j = threadIdx.x; j < L; j += blockDim.x) out[j] = 0.0f;
        return;
    }
    const float* Ua = U + (size_t)a * C * R;
    const float* Ub = U + (size_t)b * C * R;
    for (int rq = 0; rq < R * R; rq++) {
        const int r = rq / R, q = rq % R;
        double acc = 0.0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) acc += (double)Ua[c * R + r] * (double)Ub[c * R + q];
        part[threadIdx.x] = acc;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) uu[rq] = part[0];
        __syncthreads();
    }
    const float* Wa = W + (size_t)a * nt0 * R;
    const float* Wb = W + (size_t)b * nt0 * R;
    for (int i = threadIdx.x; i < nt0 * R; i += blockDim.x) {
        const int t = i / R, q = i % R;
        double acc = 0.0;
        for (int r = 0; r < R; r++) acc += (double)Wa[t * R + r] * uu[r * R + q];
        v[i] = acc;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        const int d = j - (nt0 - 1);
        double acc = 0.0;
        for (int t = max(0, d); t < min(nt0, nt0 + d); t++)
            for (int q = 0; q < R; q++) acc += v[t * R + q] * (double)Wb[(t - d) * R + q];
        out[j] = (float)acc;
    }
}
