// Runs pursuit_loop (pursuit.cu, included by the build as kernel.cu) on the host: run_pursuit_loop forks one
// process per block and starts blockDim threads in each (see prelude.h).
#include "prelude.h"
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

thread_local emu_dim threadIdx;
emu_dim blockIdx, blockDim, gridDim;
pthread_barrier_t emu_block_barrier;
pthread_barrier_t emu_warp_barrier[32];
unsigned long long emu_slots[32][32];

#include "kernel.cu"

struct LoopArgs {
    float *B, *err; int* ftype; float* residual; const float *T, *lam_mu, *lmm, *mu; const long long* neighbors;
    const float* xcorr; const long long* ftemp; unsigned char* flags; int* block_count; unsigned int* sync;
    long long *st_all, *ids_all; float *y_all, *x_all, *feat_all; int* counts;
    int n, C, K, nt0, M, n_near, n_iter, capacity; float thr2, lam, denom;
};
static LoopArgs args;

static void* thread_main(void* index) {
    threadIdx = {(unsigned)(intptr_t)index, 0, 0};
    const LoopArgs& a = args;
    pursuit_loop(a.B, a.err, a.ftype, a.residual, a.T, a.lam_mu, a.lmm, a.mu, a.neighbors, a.xcorr, a.ftemp, a.flags,
                 a.block_count, a.sync, a.st_all, a.ids_all, a.y_all, a.x_all, a.feat_all, a.counts, a.n, a.C, a.K,
                 a.nt0, a.M, a.n_near, a.n_iter, a.capacity, a.thr2, a.lam, a.denom);
    return nullptr;
}

// The number of blocks that did not finish cleanly.
extern "C" int run_pursuit_loop(int grid, int threads, const LoopArgs* loop_args) {
    args = *loop_args;
    std::vector<pid_t> blocks;
    for (int b = 0; b < grid; b++) {
        const pid_t pid = fork();
        if (pid == 0) {
            blockIdx = {(unsigned)b, 0, 0};
            gridDim = {(unsigned)grid, 1, 1};
            blockDim = {(unsigned)threads, 1, 1};
            pthread_barrier_init(&emu_block_barrier, nullptr, threads);
            for (int w = 0; w < threads / 32; w++) pthread_barrier_init(&emu_warp_barrier[w], nullptr, 32);
            std::vector<pthread_t> ts(threads);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstacksize(&attr, 1 << 17);
            for (int t = 0; t < threads; t++) pthread_create(&ts[t], &attr, thread_main, (void*)(intptr_t)t);
            for (auto& t : ts) pthread_join(t, nullptr);
            _exit(0);
        }
        blocks.push_back(pid);
    }
    int failed = 0;
    for (const pid_t pid : blocks) {
        int status;
        waitpid(pid, &status, 0);
        failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    return failed;
}
