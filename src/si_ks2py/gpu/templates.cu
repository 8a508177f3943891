// Kernels of the low-rank template model (templates.py): the factorisation of the running averages dWU
// (mexSVDsmall2.cu). Arrays are C-ordered, float64: dWU [K, nt0, C], W [K, nt0, R], U [K, C, R]; iC [C, NchanNear]
// int64 nearest channels, iW [K] int64 peak channels. One block per template.

// gram[k] = B_k' B_k [n_near, n_near], B_k = dWU[k] restricted to the neighbourhood iC[iW[k]] of its peak channel
// ([nt0, n_near]). The block stages B_k (doubles, dynamic shared memory) and each thread sums entries (a, b),
// b <= a, over time in order; the upper triangle is the mirror.
extern "C" __global__ void neighbourhood_gram(const double* __restrict__ dWU, const long long* __restrict__ iC,
                                              const long long* __restrict__ iW, double* __restrict__ gram,
                                              const int nt0, const int C, const int n_near)
{
    extern __shared__ double local[];
    const int k = blockIdx.x;
    const long long* channels = iC + iW[k] * n_near;
    for (int e = threadIdx.x; e < nt0 * n_near; e += blockDim.x) {
        const int i = e / n_near, j = e % n_near;
        local[e] = dWU[((size_t)k * nt0 + i) * C + channels[j]];
    }
    __syncthreads();
    double* g = gram + (size_t)k * n_near * n_near;
    for (int e = threadIdx.x; e < n_near * n_near; e += blockDim.x) {
        const int a = e / n_near, b = e % n_near;
        if (b > a) continue;
        double s = 0.0;
        for (int i = 0; i < nt0; i++) s += local[i * n_near + a] * local[i * n_near + b];
        g[a * n_near + b] = s;
        g[b * n_near + a] = s;
    }
}

#define ALIGN_MAX_T 128  // nt0, at most
#define ALIGN_MAX_R 8    // rank, at most
#define ALIGN_MAX_NUP 32 // sub-sample shifts, at most

// From the eigenvectors of gram[k] (ascending eigenvalues, as columns of vectors[k] [n_near, n_near]): W_k the top
// R of B_k v, each normalised (0 beyond B_k's rank: a squared norm under rank_tolerance of the first's, or beyond
// n_near), the first flipped to be negative at nt0min; U_k = B_k' W_k on the neighbourhood (0 elsewhere), mu_k =
// sqrt(1e-7 + ||U_k||^2) and U_k / mu_k; then W_k's peak of |W_k[:, 0]| circularly shifted to nt0min, the
// sub-sample shift j of largest |Ka[j] . W_k[:, 0]| applied to every rank (W_k <- Kb[j] W_k) and the first factor
// flipped against the sign of that interpolated value. Ties of the maxima go to the first index.
extern "C" __global__ void align_templates(const double* __restrict__ vectors, const double* __restrict__ dWU,
                                           const long long* __restrict__ iC, const long long* __restrict__ iW,
                                           const double* __restrict__ Ka, const double* __restrict__ Kb,
                                           double* __restrict__ W, double* __restrict__ U, double* __restrict__ mu,
                                           const int nt0, const int C, const int n_near, const int R,
                                           const int nup, const int nt0min, const double rank_tolerance)
{
    __shared__ double w[ALIGN_MAX_T][ALIGN_MAX_R];
    __shared__ double shifted[ALIGN_MAX_T][ALIGN_MAX_R];
    __shared__ double up[ALIGN_MAX_NUP];
    __shared__ double partial[32];
    __shared__ double norm;
    __shared__ double eigenvalue[ALIGN_MAX_R];  // of B_k' B_k: ||B_k v||^2
    __shared__ int peak, shift;
    const int k = blockIdx.x, tid = threadIdx.x;
    const long long* channels = iC + iW[k] * n_near;
    const double* v = vectors + (size_t)k * n_near * n_near;
    for (int e = tid; e < nt0 * R; e += blockDim.x) {
        const int i = e / R, r = e % R;
        double s = 0.0;
        if (r < n_near)
            for (int j = 0; j < n_near; j++)
                s += dWU[((size_t)k * nt0 + i) * C + channels[j]] * v[j * n_near + (n_near - 1 - r)];
        w[i][r] = s;
    }
    __syncthreads();
    if (tid < R) {
        double squares = 0.0;
        for (int i = 0; i < nt0; i++) squares += w[i][tid] * w[i][tid];
        eigenvalue[tid] = squares;
    }
    __syncthreads();
    for (int e = tid; e < nt0 * R; e += blockDim.x) {
        const double l = eigenvalue[e % R];
        w[e / R][e % R] = l > rank_tolerance * eigenvalue[0] && l > 0.0 ? w[e / R][e % R] / sqrt(l) : 0.0;
    }
    __syncthreads();
    const double at_trough = w[nt0min][0];
    const double flip = at_trough > 0.0 ? -1.0 : (at_trough < 0.0 ? 1.0 : -1.0);  // -sign(x + (x == 0))
    __syncthreads();
    for (int i = tid; i < nt0; i += blockDim.x) w[i][0] *= flip;
    __syncthreads();

    // U on the neighbourhood, its norm, and U / mu
    double* Uk = U + (size_t)k * C * R;
    for (int e = tid; e < C * R; e += blockDim.x) Uk[e] = 0.0;
    __syncthreads();
    double squares = 0.0;
    for (int e = tid; e < n_near * R; e += blockDim.x) {
        const int j = e / R, r = e % R;
        const long long c = channels[j];
        double s = 0.0;
        for (int i = 0; i < nt0; i++) s += dWU[((size_t)k * nt0 + i) * C + c] * w[i][r];
        Uk[c * R + r] = s;
        squares += s * s;
    }
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_down_sync(0xffffffffu, squares, o);
    if ((tid & 31) == 0) partial[tid >> 5] = squares;
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int q = 0; q < (int)(blockDim.x >> 5); q++) total += partial[q];
        norm = sqrt(1e-7 + total);
        mu[k] = norm;
        int best = 0;  // peak of |W[:, 0]|, the first of equal ones
        for (int i = 1; i < nt0; i++)
            if (fabs(w[i][0]) > fabs(w[best][0])) best = i;
        peak = best;
    }
    __syncthreads();
    for (int e = tid; e < n_near * R; e += blockDim.x) {
        const int j = e / R, r = e % R;
        Uk[channels[j] * R + r] /= norm;
    }

    // integer alignment, then the sub-sample shift
    for (int e = tid; e < nt0 * R; e += blockDim.x) {
        const int i = e / R, r = e % R;
        shifted[i][r] = w[(i + peak - nt0min + 2 * nt0) % nt0][r];
    }
    __syncthreads();
    for (int j = tid; j < nup; j += blockDim.x) {
        double s = 0.0;
        for (int i = 0; i < nt0; i++) s += shifted[i][0] * Ka[j * nt0 + i];
        up[j] = s;
    }
    __syncthreads();
    if (tid == 0) {
        int best = 0;
        for (int j = 1; j < nup; j++)
            if (fabs(up[j]) > fabs(up[best])) best = j;
        shift = best;
    }
    __syncthreads();
    const double sign = up[shift] > 0.0 ? 1.0 : (up[shift] < 0.0 ? -1.0 : 0.0);
    const double* kb = Kb + (size_t)shift * nt0 * nt0;
    for (int e = tid; e < nt0 * R; e += blockDim.x) {
        const int a = e / R, r = e % R;
        double s = 0.0;
        for (int b = 0; b < nt0; b++) s += kb[a * nt0 + b] * shifted[b][r];
        W[((size_t)k * nt0 + a) * R + r] = r == 0 ? -sign * s : s;
    }
}
