// layerlab's CUDA kernels as plain C++ functions: CUDA's qualifiers defined away, its thread and
// block indices as globals the Rust side sets before each call (one call per thread), and its
// correctly rounded intrinsics as single IEEE operations (the build turns contraction off).
#include <cmath>
#include <cstddef>
#include <cstring>
#include <math.h>

struct Dim3 {
    unsigned int x, y, z;
};

static Dim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__

static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::isnan;
static inline float __int_as_float(unsigned int bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#include "cuda.cu"

// The launch geometry and this call's thread: grid (gx, gy), blocks of bx threads.
extern "C" void emulation_set_thread(unsigned int gx, unsigned int gy, unsigned int bx, unsigned int block_x,
                                     unsigned int block_y, unsigned int thread_x) {
    gridDim = Dim3{gx, gy, 1};
    blockDim = Dim3{bx, 1, 1};
    blockIdx = Dim3{block_x, block_y, 0};
    threadIdx = Dim3{thread_x, 0, 0};
}
