// layerlab's own CUDA kernels, compiled at run time by NVRTC (`kernels/cuda.rs` says what each
// is for and launches it). CI compiles this file with nvcc (`nvcc -ptx`), so that a syntax error
// is found without a GPU. Every floating-point operation that must match the CPU's bits is
// rounded on its own (`__fmul_rn`, `__fadd_rn`, `__fdiv_rn`: never contracted into a fused
// multiply-add).
__device__ int first_max(const float v[4]) {
    int best = 0;
    for (int k = 1; k < 4; k++) {
        if (v[k] > v[best] || (isnan(v[k]) && !isnan(v[best]))) best = k;
    }
    return best;
}

// x [planes, h, w] -> y [planes, h/2, w/2]; one thread per output value.
extern "C" __global__ void max_pool2_forward(const float* x, float* y, unsigned int planes,
                                             unsigned int h, unsigned int w) {
    unsigned int ho = h / 2, wo = w / 2;
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * ho * wo) return;
    unsigned int p = i / (ho * wo), r = i % (ho * wo), oy = r / wo, ox = r % wo;
    const float* t = x + (size_t)p * h * w + (size_t)(2 * oy) * w + 2 * ox;
    float v[4] = {t[0], t[1], t[w], t[w + 1]};
    y[i] = v[first_max(v)];
}

// The input gradient dx [planes, h, w] from x and the output gradient g; one thread per input
// value, zero off its window's first maximum and on the odd edges the pool dropped.
extern "C" __global__ void max_pool2_backward(const float* x, const float* g, float* dx,
                                              unsigned int planes, unsigned int h, unsigned int w) {
    unsigned int ho = h / 2, wo = w / 2;
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= planes * h * w) return;
    unsigned int p = i / (h * w), r = i % (h * w), iy = r / w, ix = r % w;
    unsigned int oy = iy / 2, ox = ix / 2;
    if (oy >= ho || ox >= wo) { dx[i] = 0.0f; return; }
    const float* t = x + (size_t)p * h * w + (size_t)(2 * oy) * w + 2 * ox;
    float v[4] = {t[0], t[1], t[w], t[w + 1]};
    int at = (int)((iy % 2) * 2 + (ix % 2));
    dx[i] = first_max(v) == at ? g[(size_t)p * ho * wo + (size_t)oy * wo + ox] : 0.0f;
}

// The SGD update of up to SGD_TENSORS parameter tensors at once: blockIdx.y picks the tensor,
// blocks along x stride over its values.
#define SGD_TENSORS 32
struct SgdTable {
    float* p[SGD_TENSORS];
    float* m[SGD_TENSORS];
    const float* g[SGD_TENSORS];
    unsigned int n[SGD_TENSORS];
    unsigned int count;
};

extern "C" __global__ void sgd_update_all(SgdTable t, float lr, float mu, float wd, int nesterov) {
    unsigned int k = blockIdx.y;
    if (k >= t.count) return;
    float* p = t.p[k];
    float* m = t.m[k];
    const float* g = t.g[k];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < t.n[k]; i += gridDim.x * blockDim.x) {
        float pi = p[i];
        float gi = g[i];
        if (wd > 0.0f) gi = __fadd_rn(gi, __fmul_rn(pi, wd));
        float mi = __fadd_rn(__fmul_rn(m[i], mu), gi);
        m[i] = mi;
        float step = nesterov ? __fadd_rn(gi, __fmul_rn(mi, mu)) : mi;
        p[i] = __fsub_rn(pi, __fmul_rn(step, lr));
    }
}

// The Adam / AdamW update of up to ADAM_TENSORS parameter tensors at once, in place (parameter,
// exp_avg, exp_avg_sq), with optim::Adam's rule: the same f32 operations in the same order as
// its update_slices, each rounded on its own. `shrink` is AdamW's 1 - lr * weight_decay (1 for
// Adam), `l2` whether weight_decay joins the gradient (Adam), `lerp_from_start` whether the
// running mean moves from its old value (|1 - beta1| < 1/2, as PyTorch's lerp) or from the
// gradient; the f64 bias corrections come in rounded once: step_size = -lr / (1 - beta1^t),
// bc2_sqrt = sqrt(1 - beta2^t).
#define ADAM_TENSORS 32
struct AdamTable {
    float* p[ADAM_TENSORS];
    float* m[ADAM_TENSORS];
    float* v[ADAM_TENSORS];
    const float* g[ADAM_TENSORS];
    unsigned int n[ADAM_TENSORS];
    unsigned int count;
};

extern "C" __global__ void adam_update_all(AdamTable t, float shrink, float step_size, float bc2_sqrt,
                                           float beta1_weight, float beta2, float one_minus_beta2, float eps,
                                           float wd, int decoupled, int l2, int lerp_from_start) {
    unsigned int k = blockIdx.y;
    if (k >= t.count) return;
    float* p = t.p[k];
    float* m = t.m[k];
    float* v = t.v[k];
    const float* g = t.g[k];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < t.n[k]; i += gridDim.x * blockDim.x) {
        float pi = p[i];
        if (decoupled) pi = __fmul_rn(pi, shrink);
        float gi = g[i];
        if (l2) gi = __fadd_rn(gi, __fmul_rn(wd, pi));
        float mi = m[i];
        mi = lerp_from_start ? __fadd_rn(mi, __fmul_rn(beta1_weight, __fsub_rn(gi, mi)))
                             : __fsub_rn(gi, __fmul_rn(__fsub_rn(gi, mi), __fsub_rn(1.0f, beta1_weight)));
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(step_size, mi), denom));
    }
}

// The batch images[positions[b]] [n, c, h, w] under each image's packed shift, scaled to
// p / 255: `kernels::pixels`'s rule. One thread per output value.
extern "C" __global__ void gather_batch(const unsigned char* images, const unsigned int* positions,
                                        const unsigned int* shifts, float* out, unsigned int n,
                                        unsigned int c, unsigned int h, unsigned int w) {
    unsigned int plane = h * w, size = c * plane;
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * size) return;
    unsigned int b = i / size, r = i % size, ch = r / plane, y = (r % plane) / w, x = r % w;
    unsigned int s = shifts[b];
    int dy = (int)(s & 0xff) - 4, dx = (int)((s >> 8) & 0xff) - 4;
    int sx = (int)(((s >> 16) & 1) ? w - 1 - x : x) + dx;
    int sy = (int)y + dy;
    float v = 0.0f;
    if (sx >= 0 && sy >= 0 && sx < (int)w && sy < (int)h) {
        v = __fdiv_rn((float)images[(size_t)positions[b] * size + (size_t)ch * plane + (size_t)sy * w + sx], 255.0f);
    }
    out[i] = v;
}

// Evaluation-mode BatchNorm as x * scale[ch] + shift[ch] over [n, c, hw], then max(y, 0) when
// `relu`: the CPU's `norm::affine`, each operation rounded on its own.
extern "C" __global__ void channel_affine(const float* x, const float* scale, const float* shift,
                                          float* y, unsigned int total, unsigned int c,
                                          unsigned int hw, int relu) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    unsigned int ch = (i / hw) % c;
    float v = __fadd_rn(__fmul_rn(x[i], scale[ch]), shift[ch]);
    y[i] = relu ? fmaxf(v, 0.0f) : v;
}

// Running statistics after a training step: out = [mean' | var'] with r' = r * keep + batch * take
// for r the running mean (then variance) and batch the step's [mean | unbiased variance].
extern "C" __global__ void running_stats(const float* mean, const float* var, const float* batch,
                                         float* out, unsigned int c, float keep, float take) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= 2 * c) return;
    float r = i < c ? mean[i] : var[i - c];
    out[i] = __fadd_rn(__fmul_rn(r, keep), __fmul_rn(batch[i], take));
}

// max(x, 0) as the CPU's `relu_values` computes it (NaN and -0.0 pass through).
extern "C" __global__ void relu_forward(const float* x, float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    y[i] = v < 0.0f ? 0.0f : v;
}

// max(y, 0) in place, for ops with a ReLU folded in.
extern "C" __global__ void relu_in_place(float* y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = y[i];
    y[i] = v < 0.0f ? 0.0f : v;
}

// The ReLU's input gradient from its output y: g where y > 0, else +0.0 (`relu_grad_values`).
extern "C" __global__ void relu_backward(const float* y, const float* g, float* dx, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dx[i] = y[i] > 0.0f ? g[i] : 0.0f;
}

// Softmax cross-entropy, one thread per row: the row's loss and whether its first maximum is at
// its label (`kernels::loss::row_loss`, the same operations in the same order).
extern "C" __global__ void cross_entropy_rows(const float* x, const unsigned int* labels, float* loss,
                                              unsigned int* right, unsigned int n, unsigned int k) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* row = x + (size_t)i * k;
    unsigned int best = 0;
    float max = __int_as_float(0xff800000);  // -infinity
    for (unsigned int c = 0; c < k; c++) {
        if (row[c] > max) { best = c; max = row[c]; }
    }
    float sum = 0.0f;
    for (unsigned int c = 0; c < k; c++) sum = __fadd_rn(sum, expf(__fsub_rn(row[c], max)));
    float log_sum = logf(sum);
    loss[i] = __fsub_rn(log_sum, __fsub_rn(row[labels[i]], max));
    right[i] = best == labels[i] ? 1u : 0u;
}

// The rows' losses summed in order in double by one thread, as `kernels::loss::forward_values`:
// out = [mean loss, right predictions]. A few thousand additions at most: one thread keeps the
// order fixed, so the sum is the same every run.
extern "C" __global__ void cross_entropy_sum(const float* loss, const unsigned int* right, float* out,
                                             unsigned int n) {
    if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
    double s = 0.0;
    unsigned int r = 0;
    for (unsigned int i = 0; i < n; i++) {
        s += (double)loss[i];
        r += right[i];
    }
    out[0] = (float)(s / (double)(n > 0 ? n : 1));
    out[1] = (float)r;
}

// The logits' gradient, one thread per value: (softmax(x) - onehot(label)) * (g[0] * (1 / n))
// (`kernels::loss::grad_values`).
extern "C" __global__ void cross_entropy_grad(const float* x, const unsigned int* labels, const float* g,
                                              float* dx, unsigned int n, unsigned int k) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * k) return;
    unsigned int r = i / k, c = i % k;
    const float* row = x + (size_t)r * k;
    float max = __int_as_float(0xff800000);
    for (unsigned int j = 0; j < k; j++) max = row[j] > max ? row[j] : max;
    float sum = 0.0f;
    for (unsigned int j = 0; j < k; j++) sum = __fadd_rn(sum, expf(__fsub_rn(row[j], max)));
    float log_sum = logf(sum);
    float p = expf(__fsub_rn(__fsub_rn(row[c], max), log_sum));
    float scale = __fmul_rn(g[0], __fdiv_rn(1.0f, (float)(n > 0 ? n : 1)));
    dx[i] = __fmul_rn(__fsub_rn(p, c == labels[r] ? 1.0f : 0.0f), scale);
}
