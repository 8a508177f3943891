// Kernels of the split stage: the clusters of a round are segments of consecutive rows.

// One EM step of the 1-D two-Gaussian mixture (segment_em_step of the NumPy twin), one block of SPLIT_THREADS
// threads per segment: the responsibilities rs [n, 2] of the segment's x [n] under its params (p, mu1, mu2, s1,
// s2) (weights p, 1 - p), and its new params in out [5]. An inactive segment keeps its params and rs. Every sum
// is per-thread strided partial sums, then a fixed tree: deterministic.
#define SPLIT_THREADS 512

__device__ void block_sum(double* shared, double* values, const int count)
{
    for (int j = 0; j < count; j++) shared[j * SPLIT_THREADS + threadIdx.x] = values[j];
    __syncthreads();
    for (int half = SPLIT_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half)
            for (int j = 0; j < count; j++)
                shared[j * SPLIT_THREADS + threadIdx.x] += shared[j * SPLIT_THREADS + threadIdx.x + half];
        __syncthreads();
    }
    for (int j = 0; j < count; j++) values[j] = shared[j * SPLIT_THREADS];
    __syncthreads();
}

extern "C" __global__ void segment_em_step(const double* __restrict__ x_all, const long long* __restrict__ bounds,
                                           const double* __restrict__ params_all,
                                           const unsigned char* __restrict__ active, double* __restrict__ rs_all,
                                           double* __restrict__ out_all)
{
    __shared__ double shared[3 * SPLIT_THREADS];
    const int s = blockIdx.x;
    const double* params = params_all + 5 * s;
    double* out = out_all + 5 * s;
    if (!active[s]) {  // the whole block leaves: no barrier is skipped by part of it
        if (threadIdx.x < 5) out[threadIdx.x] = params[threadIdx.x];
        return;
    }
    const long long n = bounds[s + 1] - bounds[s];
    const double* x = x_all + bounds[s];
    double* rs = rs_all + 2 * bounds[s];
    const double p = params[0], mu1 = params[1], mu2 = params[2], s1 = params[3], s2 = params[4];
    const double c1 = -0.5 * log(s1) + log(p), c2 = -0.5 * log(s2) + log(1 - p);
    double sums[3] = {0.0, 0.0, 0.0};  // r1, r1 * x, r2 * x
    for (long long i = threadIdx.x; i < n; i += SPLIT_THREADS) {
        const double xi = x[i];
        const double l1 = c1 - (xi - mu1) * (xi - mu1) / (2 * s1);
        const double l2 = c2 - (xi - mu2) * (xi - mu2) / (2 * s2);
        const double top = l2 > l1 ? l2 : l1;  // as max(l1, l2) of the twin
        const double e1 = exp(l1 - top), e2 = exp(l2 - top);
        const double r1 = e1 / (e1 + e2), r2 = e2 / (e1 + e2);
        rs[2 * i] = r1;
        rs[2 * i + 1] = r2;
        sums[0] += r1;
        sums[1] += r1 * xi;
        sums[2] += r2 * xi;
    }
    block_sum(shared, sums, 3);
    const double r1_sum = sums[0], r2_sum = n - sums[0];
    const double m1 = sums[1] / r1_sum, m2 = sums[2] / r2_sum;
    double var[2] = {0.0, 0.0};
    for (long long i = threadIdx.x; i < n; i += SPLIT_THREADS) {
        const double xi = x[i];
        var[0] += rs[2 * i] * (xi - m1) * (xi - m1);
        var[1] += rs[2 * i + 1] * (xi - m2) * (xi - m2);
    }
    block_sum(shared, var, 2);
    if (threadIdx.x == 0) {
        out[0] = r1_sum / n;
        out[1] = m1;
        out[2] = m2;
        out[3] = var[0] / r1_sum;
        out[4] = var[1] / r2_sum;
    }
}

// out [S, E] = the sums of each segment's chunk partials [n_chunks, E]; segment s owns chunks chunk_bounds[s] to
// chunk_bounds[s + 1] - 1, added in order (deterministic).
extern "C" __global__ void sum_chunks(const double* __restrict__ partial, const long long* __restrict__ chunk_bounds,
                                      double* __restrict__ out, const int S, const long long E)
{
    const long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (index >= S * E) return;
    const int s = (int)(index / E);
    const long long e = index % E;
    double total = 0.0;
    for (long long c = chunk_bounds[s]; c < chunk_bounds[s + 1]; c++) total += partial[c * E + e];
    out[index] = total;
}
