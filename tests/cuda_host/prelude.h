// Host emulation of the CUDA constructs that pursuit.cu's pursuit_loop uses, so that tests can run the kernel's
// own source on a machine without a GPU: each block is a forked process (its statics are the block's shared
// memory), each thread a pthread; global memory is a shared mapping made before the fork; warp shuffles exchange
// values through per-warp slots between two barriers of the warp. Float intrinsics are the plain operations
// (compiled without contraction, so each rounds once, as the _rn intrinsics do).
#pragma once
#include <pthread.h>
#include <sched.h>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <algorithm>
using std::min; using std::max;
struct emu_dim { unsigned int x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
extern thread_local emu_dim threadIdx;
extern emu_dim blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(a, b)
#define __shared__ static
#define __CUDA_ARCH__ 900
inline void __nanosleep(unsigned) { sched_yield(); }
extern pthread_barrier_t emu_block_barrier;
extern pthread_barrier_t emu_warp_barrier[32];
extern unsigned long long emu_slots[32][32];
inline void __syncthreads() { pthread_barrier_wait(&emu_block_barrier); }
template <class T> inline T emu_shuffle(T v, int src) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    emu_slots[w][lane] = bits;
    pthread_barrier_wait(&emu_warp_barrier[w]);
    T r = v;
    if (src >= 0 && src < 32) memcpy(&r, &emu_slots[w][src], sizeof(T));
    pthread_barrier_wait(&emu_warp_barrier[w]);
    return r;
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
    const int lane = threadIdx.x % 32; return emu_shuffle(v, lane >= o ? lane - o : -1); }
template <class T> inline T __shfl_down_sync(unsigned, T v, int o) {
    const int lane = threadIdx.x % 32; return emu_shuffle(v, lane + o < 32 ? lane + o : -1); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
