// Launches an emulated kernel (prelude.h): emu_launch forks one process per block of the grid and starts one
// pthread per thread of the block, each running `body` with its threadIdx set. Included by one file of each
// emulation library: it defines the emulation's globals.
#pragma once
#include "prelude.h"
#include <sys/wait.h>
#include <unistd.h>
#include <functional>
#include <vector>

thread_local emu_dim threadIdx;
emu_dim blockIdx, blockDim, gridDim;
pthread_barrier_t emu_block_barrier;
pthread_barrier_t emu_warp_barrier[32];
unsigned long long emu_slots[32][32];

static std::function<void()> emu_body;

static void* emu_thread_main(void* index) {
    const unsigned t = (unsigned)(intptr_t)index;
    threadIdx = {t % blockDim.x, t / blockDim.x, 0};
    emu_body();
    return nullptr;
}

// The number of blocks that did not finish cleanly. Block sizes are multiples of 32 (whole warps).
static int emu_launch(emu_dim grid, emu_dim block, std::function<void()> body) {
    emu_body = std::move(body);
    const int blocks = (int)(grid.x * grid.y), threads = (int)(block.x * block.y);
    std::vector<pid_t> children;
    for (int b = 0; b < blocks; b++) {
        const pid_t pid = fork();
        if (pid == 0) {
            blockIdx = {(unsigned)b % grid.x, (unsigned)b / grid.x, 0};
            gridDim = {grid.x, grid.y, 1};
            blockDim = {block.x, block.y, 1};
            pthread_barrier_init(&emu_block_barrier, nullptr, threads);
            for (int w = 0; w < threads / 32; w++) pthread_barrier_init(&emu_warp_barrier[w], nullptr, 32);
            std::vector<pthread_t> ts(threads);
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setstacksize(&attr, 1 << 17);
            for (int t = 0; t < threads; t++) pthread_create(&ts[t], &attr, emu_thread_main, (void*)(intptr_t)t);
            for (auto& t : ts) pthread_join(t, nullptr);
            _exit(0);
        }
        children.push_back(pid);
    }
    int failed = 0;
    for (const pid_t pid : children) {
        int status;
        waitpid(pid, &status, 0);
        failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    return failed;
}
