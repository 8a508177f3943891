// Kernels of the split stage.

// One EM step of the 1-D two-Gaussian mixture (mixture_em_step of the NumPy twin) in one block of SPLIT_THREADS
// threads: the responsibilities rs [n, 2] of x [n] under params = (p, mu1, mu2, s1, s2) (weights p, 1 - p), and
// the new params in out [5]. Every sum is per-thread strided partial sums, then a fixed tree: deterministic.
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

extern "C" __global__ void mixture_em_step(const double* __restrict__ x, const double* __restrict__ params,
                                           double* __restrict__ rs, double* __restrict__ out, const long long n)
{
    __shared__ double shared[3 * SPLIT_THREADS];
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
