//! The 2-D convolution used by the models (a kernel of [`crate::kernels`]): direct kernels and
//! im2col + gemm on the CPU, with its own backward.
//!
//! candle's CPU `conv2d` backward goes through a direct-loop `conv_transpose2d`, which made
//! training CNNs an order of magnitude slower than it needs to be. [`conv2d`] runs f32 tensors
//! on the CPU through [`Conv2d`], a candle custom op whose forward is im2col followed by one
//! matrix product per chunk of images, and whose backward computes the input gradient
//! (Wᵀ·grad, then col2im) and the weight gradient (grad·colsᵀ) the same way. f32 on a GPU goes
//! through cuDNN (`kernels::cudnn`, the `cuda` feature); other devices and dtypes keep candle's
//! own `conv2d`.
//!
//! Same-size 3×3 convolutions with enough channels skip the column matrix on CPUs with AVX-512:
//! a direct kernel ([`direct`]) keeps a tile of outputs in registers through all taps and input
//! channels, on planes laid out with their zero border ([`shifted`], 16×16 and larger) or with
//! 16 images side by side in each vector ([`interleaved`], 8×8 down to 2×2; also the forward
//! pass of stride-2 layers, [`interleaved_strided`]).
//!
//! Work is split into chunks of images whose size depends only on the shapes, never on the
//! number of threads, and every matrix product runs single-threaded inside its chunk; chunks run
//! in parallel on rayon's current pool. The weight gradient sums over images in a fixed number of
//! groups, then adds the group sums in order, so every result is the same for any thread count.

use std::ops::Range;

use anyhow::Result;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::matmul;
use super::{built_in_pieces, f32_data, layers, Piece};

/// Square-kernel convolution with equal padding on every side (dilation 1, one group).
///
/// `x` is [n, cin, h, w] and `weight` [cout, cin, k, k] (PyTorch layout). Gradients flow to both.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cudnn::applies(x, weight) {
        return Ok(super::cudnn::conv2d(x, weight, padding, stride)?);
    }
    if fast_path_applies(x, weight, padding, stride) {
        let op = Conv2d { padding, stride };
        return Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?);
    }
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
}

/// [`conv2d`] followed by a per-channel `bias` [cout], added inside the same op on the fast path.
pub fn conv2d_bias(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if fast_path_applies(x, weight, padding, stride) && bias.dtype() == DType::F32 && bias.device().is_cpu() {
        let op = Conv2d { padding, stride };
        return Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, bias, op)?);
    }
    Ok(conv2d(x, weight, padding, stride)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?)
}

/// The gradients of [`conv2d`] (`bias` `None`) or [`conv2d_bias`] at input `x`, from the
/// output's gradient `grad`: the input's (only when `need_input`: the images entering the first
/// layer need none), the weight's and the bias's. The same kernels, called the same way, as the
/// backward pass candle's autograd runs for those ops on the same device, so the same values:
/// this is the convolution's step of [`crate::backward`].
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    grad: &Tensor,
    (padding, stride): (usize, usize),
    need_input: bool,
) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
    let fast = fast_path_applies(x, weight, padding, stride);
    let grad_bias = match bias {
        None => None,
        // The fused op's (`Conv2d` as a CustomOp3): one pass of our own.
        Some(b) if fast && b.dtype() == DType::F32 && b.device().is_cpu() => {
            Some(grad.apply_op1_no_bwd(&layers::ChannelSum)?.reshape(b.shape())?)
        }
        // A broadcast add's, as candle computes it: a sum over the dimensions it broadcast.
        Some(b) => {
            let dims = [0, 2, 3].into_iter().filter(|&d| grad.dims().get(d) != Some(&1)).collect::<Vec<_>>();
            Some(grad.sum_keepdim(dims)?.reshape(b.shape())?)
        }
    };
    let (_, _, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    #[cfg(feature = "cuda")]
    if super::cudnn::applies(x, weight) {
        let grad = grad.contiguous()?;
        let grad_x =
            if need_input { Some(super::cudnn::grad_input(&grad, weight, padding, stride, (h, w))?) } else { None };
        return Ok((grad_x, super::cudnn::grad_weight(x, &grad, padding, stride, k)?, grad_bias));
    }
    if !fast {
        anyhow::bail!(
            "the convolution of {:?} by {:?} runs as candle's own op, whose gradient only candle's autograd computes",
            x.dims(),
            weight.dims()
        )
    }
    let grad = grad.contiguous()?;
    let grad_x = if need_input { Some(conv2d_grad_input(&grad, weight, padding, stride, (h, w))?) } else { None };
    Ok((grad_x, conv2d_grad_weight(x, &grad, padding, stride, k)?, grad_bias))
}

/// The input gradient of [`conv2d`] alone: `grad` [n, cout, ho, wo] and `weight` [cout, cin, k, k]
/// to [n, cin, h, w], for an input of `h` × `w`. Timed by `layerlab-bench profile`.
pub fn conv2d_grad_input(
    grad: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cudnn::applies(grad, weight) {
        return Ok(super::cudnn::grad_input(grad, weight, padding, stride, (h, w))?);
    }
    Ok(grad.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Conv2dGradInput { padding, stride, h, w })?)
}

/// The weight gradient of [`conv2d`] alone: `x` [n, cin, h, w] and `grad` [n, cout, ho, wo] to
/// [cout, cin, k, k]. Timed by `layerlab-bench profile`.
pub fn conv2d_grad_weight(x: &Tensor, grad: &Tensor, padding: usize, stride: usize, k: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cudnn::applies(x, grad) {
        return Ok(super::cudnn::grad_weight(x, grad, padding, stride, k)?);
    }
    Ok(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &Conv2dGradWeight { padding, stride, k })?)
}

/// The reference: candle's own convolution, whatever the device and dtype.
pub fn conv2d_candle(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    Ok(x.conv2d(weight, padding, stride, 1, 1)?)
}

fn fast_path_applies(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> bool {
    x.device().is_cpu()
        && weight.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && Geom::new(x.dims(), weight.dims(), padding, stride).is_ok()
}

/// Images per chunk aim at this many output positions per matrix product.
const TARGET_COLUMNS: usize = 512;
/// Batches are cut into at least this many chunks (when they have that many images), so that
/// the cores share even the layers with tiny feature maps.
const MIN_CHUNKS: usize = 8;
/// The weight gradient is summed in this many fixed groups of chunks.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Geom {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) o: usize,
    pub(crate) k: usize,
    stride: usize,
    pad: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geom {
    pub(crate) fn new(x: &[usize], weight: &[usize], pad: usize, stride: usize) -> candle_core::Result<Geom> {
        let (&[n, c, h, w], &[o, wc, kh, kw]) = (x, weight) else {
            bail!("conv2d wants a 4-D input and a 4-D weight, got {x:?} and {weight:?}")
        };
        if wc != c || kh != kw || kh == 0 || stride == 0 {
            bail!("conv2d: input {x:?} does not fit weight {weight:?} with stride {stride}")
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            bail!("conv2d: input {x:?} with padding {pad} is smaller than the kernel {weight:?}")
        }
        let (ho, wo) = ((h + 2 * pad - kh) / stride + 1, (w + 2 * pad - kw) / stride + 1);
        Ok(Geom { n, c, h, w, o, k: kh, stride, pad, ho, wo })
    }

    /// Rows of the column matrix: one per (input channel, kernel row, kernel column).
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    fn image_in(&self) -> usize {
        self.c * self.h * self.w
    }
    fn image_out(&self) -> usize {
        self.o * self.hw_out()
    }

    /// Images per chunk: a function of the shapes only.
    fn chunk_images(&self) -> usize {
        let wanted = TARGET_COLUMNS.div_ceil(self.hw_out().max(1));
        wanted.min(self.n.div_ceil(MIN_CHUNKS)).max(1)
    }

    /// The image ranges of the chunks, in order.
    fn chunks(&self) -> Vec<Range<usize>> {
        let b = self.chunk_images();
        (0..self.n.div_ceil(b)).map(|i| i * b..((i + 1) * b).min(self.n)).collect()
    }

    /// Whether im2col and col2im go through [`tap_table`]: planes of up to 4×4, and those up to
    /// [`SMALL_PLANE`] values that the block copies of [`same_size_span`] do not cover (measured:
    /// on 8×8 planes the block copies are faster).
    fn small(&self) -> bool {
        let hw = self.h * self.w;
        let same_size = self.stride == 1 && self.ho == self.h && self.wo == self.w;
        hw <= 16 || (hw <= SMALL_PLANE && !same_size)
    }

    /// Output positions `lo..hi` along one axis whose input index `o * stride + kk - pad` lies
    /// inside `0..size`.
    fn valid(&self, kk: usize, size: usize, out: usize) -> (usize, usize) {
        let lo = if kk >= self.pad { 0 } else { (self.pad - kk).div_ceil(self.stride) };
        let hi = if size + self.pad > kk { ((size + self.pad - kk - 1) / self.stride + 1).min(out) } else { 0 };
        (lo.min(hi), hi)
    }
}

/// The forward op: `x` [n, c, h, w] and `weight` [o, c, k, k] to [n, o, ho, wo].
#[derive(Debug, Clone, Copy)]
struct Conv2d {
    padding: usize,
    stride: usize,
}

/// The input gradient: `grad` [n, o, ho, wo] and `weight` [o, c, k, k] to [n, c, h, w].
#[derive(Debug, Clone, Copy)]
struct Conv2dGradInput {
    padding: usize,
    stride: usize,
    h: usize,
    w: usize,
}

/// The weight gradient: `x` [n, c, h, w] and `grad` [n, o, ho, wo] to [o, c, k, k].
#[derive(Debug, Clone, Copy)]
struct Conv2dGradWeight {
    padding: usize,
    stride: usize,
    k: usize,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "layerlab-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let (x, weight) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let y = forward(&g, &x, &weight, None);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let (_, _, k, _) = weight.dims4()?;
        let grad = grad.contiguous()?;
        let gi = Conv2dGradInput { padding: self.padding, stride: self.stride, h, w };
        let gw = Conv2dGradWeight { padding: self.padding, stride: self.stride, k };
        // Inputs that need no gradient (the images entering the first layer) cost nothing.
        let grad_x = if x.track_op() { Some(grad.apply_op2_no_bwd(weight, &gi)?) } else { None };
        let grad_w = if weight.track_op() { Some(x.apply_op2_no_bwd(&grad, &gw)?) } else { None };
        Ok((grad_x, grad_w))
    }
}

/// The same op with a bias [o] as third argument.
impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.padding, self.stride)?;
        let (x, weight, bias) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        if bias.len() != g.o {
            bail!("conv2d: bias {:?} does not fit weight {:?}", l3.dims(), l2.dims())
        }
        let y = forward(&g, &x, &weight, Some(&bias));
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w) = CustomOp2::bwd(self, x, weight, res, grad)?;
        let grad_b = if bias.track_op() {
            Some(grad.apply_op1_no_bwd(&layers::ChannelSum)?.reshape(bias.shape())?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

impl CustomOp2 for Conv2dGradInput {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[n, o, ho, wo], &[_, c, ..]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d input gradient: unexpected shapes {:?} and {:?}", l1.dims(), l2.dims())
        };
        let g = Geom::new(&[n, c, self.h, self.w], l2.dims(), self.padding, self.stride)?;
        if (g.o, g.ho, g.wo) != (o, ho, wo) {
            bail!("conv2d input gradient: gradient {:?} does not fit {g:?}", l1.dims())
        }
        let (grad, weight) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let dx = grad_input(&g, &grad, &weight);
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

impl CustomOp2 for Conv2dGradWeight {
    fn name(&self) -> &'static str {
        "layerlab-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[_, c, ..], &[_, o, ho, wo]) = (l1.dims(), l2.dims()) else {
            bail!("conv2d weight gradient: unexpected shapes {:?} and {:?}", l1.dims(), l2.dims())
        };
        let g = Geom::new(l1.dims(), &[o, c, self.k, self.k], self.padding, self.stride)?;
        if (g.n, g.ho, g.wo) != (l2.dims()[0], ho, wo) {
            bail!("conv2d weight gradient: gradient {:?} does not fit {g:?}", l2.dims())
        }
        let (x, grad) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let dw = grad_weight(&g, &x, &grad);
        Ok((CpuStorage::F32(dw), Shape::from((g.o, g.c, g.k, g.k))))
    }
}

/// Buffers of one worker thread, kept between calls: the column matrices of a large layer are
/// megabytes, and a fresh allocation each time costs page faults and zero-filling as much as
/// the copies into it.
#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    mat: Vec<f32>,
    /// The column matrix transposed, [positions, c·k·k], for the weight gradient.
    cols_t: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's [`Scratch`]. `f` must not run rayon work itself (every matrix
/// product here is single-threaded), so the buffers are never borrowed twice.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// The first `len` values of `v`, growing it when needed. Old contents are left in place: every
/// caller overwrites the whole slice.
fn resized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// `dst` [cols, rows] = `src` [rows, cols]ᵀ, in square tiles so that both sides are read and
/// written a cache line at a time.
///
/// Used for the weight of the forward pass, once per call: `gemm` packs its operands into panels
/// and then reads the weight along its columns instead of one value per row. For the much larger
/// column matrix a transpose after the fact was measured slower than building it transposed
/// ([`im2col_t`]).
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 16;
    super::vectorized(|| {
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let row = &src[r * cols..][..cols];
                    for c in c0..(c0 + TILE).min(cols) {
                        dst[c * rows + r] = row[c];
                    }
                }
            }
        }
    })
}

/// The convolution of `x` [n, c, h, w] with `weight` [o, c, k, k] (plus `bias` [o]): [n, o, ho, wo].
pub(crate) fn forward(g: &Geom, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.n * g.image_out() == 0 {
        return Vec::new();
    }
    if interleaved(g) || interleaved_strided(g) {
        let taps = taps_of(weight, g.o, g.c, false);
        return interleaved_conv(g, (g.c, g.o), x, &taps, &interleaved_offsets(g.w, false), bias);
    }
    if shifted(g) {
        // y[o, ·] = Σ over taps of weight[·, ·, tap] [o, c] · x shifted by the tap.
        let taps = taps_of(weight, g.o, g.c, false);
        let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * (g.w + 2) + t % 3);
        return built_in_pieces(g.n * g.image_out(), g.image_out(), |i, y| {
            shifted_image(g, (g.c, g.o), &x[i * g.image_in()..][..g.image_in()], &taps, &offsets, bias, y)
        });
    }
    let (ckk, hwo, b) = (g.ckk(), g.hw_out(), g.chunk_images());
    // The weight as [c·k·k, o], so that gemm reads it along the rows it packs.
    let mut weight_t = vec![0f32; weight.len()];
    transpose(weight, g.o, ckk, &mut weight_t);
    let weight_t = &weight_t;
    // Written piece by piece, with no zero-filled output first: that fill ran on one thread
    // (ResNet's first layer at 2 threads: 0.95–0.98 ms now, 1.08–1.15 with the fill).
    built_in_pieces(g.n * g.image_out(), b * g.image_out(), |i, y| {
        with_scratch(|s| {
            let images = (g.n - i * b).min(b);
            let nc = images * hwo;
            let x = &x[i * b * g.image_in()..][..images * g.image_in()];
            let cols = resized(&mut s.cols, ckk * nc);
            im2col(g, x, images, cols);
            let tmp = resized(&mut s.mat, g.o * nc);
            matmul(g.o, nc, ckk, tmp, nc, false, weight_t, (1, g.o), cols, (nc, 1));
            // tmp is [o, image, position]; y is [image, o, position].
            for im in 0..images {
                for oc in 0..g.o {
                    let src = &tmp[oc * nc + im * hwo..][..hwo];
                    match bias {
                        Some(bias) => y.extend(src.iter().map(|v| v + bias[oc])),
                        None => y.extend(src.iter().copied()),
                    }
                }
            }
        })
    })
}

/// Planes of at least this many values take the shifted products (see [`shifted`]).
const SHIFTED_MIN_PLANE: usize = 256;

/// Whether the three passes run as a direct convolution ([`direct`])
/// instead of one product over an unfolded column matrix: 3×3 convolutions with stride 1 that
/// keep the size (padding 1), on planes of [`SHIFTED_MIN_PLANE`] values or more, with the
/// channel counts of [`direct_fits`].
///
/// Why: on ResNet-18's 32×32 layers (16 channels) `gemm` ran at about 63 GFLOP/s a core against
/// PyTorch's 95; its panels suit large products, and these have 16 rows. Nine separate `gemm`
/// calls over the shifted input (one per tap) were measured no faster than the column matrix.
/// The direct kernel keeps an 8-channel × 48-position tile in registers through all taps and
/// input channels.
fn shifted(g: &Geom) -> bool {
    g.k == 3 && g.stride == 1 && g.pad == 1 && g.h * g.w >= SHIFTED_MIN_PLANE && direct_fits(g)
}

/// The channel counts the direct kernels take: 8 or more input and output channels, multiples
/// of 4 (for the weight gradient's tiles, [`direct::GRAD_CHANNELS`] outputs × `GRAD_TAPS`
/// (input channel, tap) pairs out of 9 per input channel), on a CPU with AVX-512.
fn direct_fits(g: &Geom) -> bool {
    g.c >= 8 && g.o >= 8 && g.c.is_multiple_of(4) && g.o.is_multiple_of(direct::GRAD_CHANNELS) && direct::available()
}

/// Images side by side in the vectors of an [`interleaved`] convolution.
const LANES: usize = 16;

/// Planes of at least this many values (and under [`SHIFTED_MIN_PLANE`]) take the interleaved
/// products.
const INTERLEAVED_MIN_PLANE: usize = 4;

/// Of those, planes of at least this many values also take the interleaved weight gradient
/// ([`grad_weight_interleaved`]); smaller ones keep im2col + `gemm` for it.
const INTERLEAVED_WEIGHT_GRAD_MIN_PLANE: usize = 64;

/// Whether the forward pass and the input gradient run as a direct convolution with [`LANES`]
/// images in each vector (see [`interleave`]): same-size 3×3 convolutions on planes of
/// [`INTERLEAVED_MIN_PLANE`] to [`SHIFTED_MIN_PLANE`] values (the 8×8, 4×4 and 2×2 layers of
/// ResNet and VGG), with the channel counts of [`direct_fits`].
///
/// Why: the shifted layout of [`shifted_image`] would compute each padded row's two border
/// columns too (a fifth of an 8×8 plane's work); with one image per lane, every vector is one
/// output position of 16 images, no position is computed in vain and every read is a whole
/// aligned vector. Measured against im2col + `gemm`, each pass timed in turn in one process at 1
/// thread: on 8×8 planes 0.6–1.0× the time; on 4×4 and 2×2 planes with 128 channels 0.74–0.89×
/// once the weights were laid out in blocks ([`taps_of`]; before that, 1.1–1.3×). The weight
/// gradient: 0.78–0.93× `gemm`'s on 8×8 planes with up to 64 channels, 1.0–1.13× on 4×4 and 2×2
/// (see [`INTERLEAVED_WEIGHT_GRAD_MIN_PLANE`]); measured again on AMD Zen 4 once its
/// accumulators stayed in registers, 0.95–1.0× on 4×4 and 1.05–1.15× on 2×2, so those still
/// keep `gemm`.
fn interleaved(g: &Geom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.pad == 1
        && (INTERLEAVED_MIN_PLANE..SHIFTED_MIN_PLANE).contains(&(g.h * g.w))
        && direct_fits(g)
}

/// Input planes of at most this many values take the interleaved forward pass at stride 2.
const STRIDED_MAX_PLANE: usize = 1024;

/// Of those, input planes of at least this many values also take the interleaved weight
/// gradient ([`grad_weight_interleaved`]).
const STRIDED_WEIGHT_GRAD_MIN_PLANE: usize = 256;

/// Whether the forward pass of a stride-2 3×3 convolution with padding 1 (ResNet's first
/// convolution of layers 2 to 4) runs with images in the lanes, as [`interleaved`] ones do, on
/// input planes of up to [`STRIDED_MAX_PLANE`] values.
///
/// Why: im2col + `gemm` ran these at half the rate of the stride-1 layers. Measured in turn in
/// one process, 1 thread, batch 128: 0.61–0.64× the time on 32×32 and 16×16 inputs, 0.93× on
/// 8×8. The weight gradient of the same layout (once its accumulators stayed in registers, see
/// `direct::x86::weight_grad`): 0.83× `gemm`'s on 32×32 inputs, 0.9–0.95× on 16×16, 1.1–1.2× on
/// 8×8 (which keeps `gemm`, [`STRIDED_WEIGHT_GRAD_MIN_PLANE`]). The input gradient of a stride-2
/// convolution is not a convolution of this kind and keeps `gemm`.
fn interleaved_strided(g: &Geom) -> bool {
    g.k == 3 && g.stride == 2 && g.pad == 1 && g.h * g.w <= STRIDED_MAX_PLANE && direct_fits(g)
}

/// `dst` [k, h + 2·pad, w + 2·pad, LANES] from the planes of up to [`LANES`] images `src`
/// [images, k, h, w]: image i in lane i, with a zero border and zero lanes past the last image.
fn interleave(src: &[f32], k: usize, h: usize, w: usize, pad: usize, dst: &mut [f32]) {
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let images = src.len() / (k * h * w).max(1);
    dst.fill(0.0);
    for ch in 0..k {
        for y in 0..h {
            let row = &mut dst[((ch * hp + y + pad) * wp + pad) * LANES..][..w * LANES];
            for lane in 0..images {
                let src = &src[((lane * k + ch) * h + y) * w..][..w];
                for (x, &v) in src.iter().enumerate() {
                    row[x * LANES + lane] = v;
                }
            }
        }
    }
}

/// `images` images [images, m, hw] (plus `bias` [m]) written to `dst` from `src` [m, hw, LANES]:
/// lane i to image i.
fn deinterleave(src: &[f32], images: usize, m: usize, hw: usize, bias: Option<&[f32]>, dst: &mut Piece<'_>) {
    for lane in 0..images {
        for ch in 0..m {
            let b = bias.map_or(0.0, |b| b[ch]);
            let src = &src[ch * hw * LANES..][..hw * LANES];
            dst.extend(src.chunks_exact(LANES).map(|p| p[lane] + b));
        }
    }
}

/// For each output position of `g` in order: where its window starts in an interleaved input
/// plane padded by one ([`interleave`]) and its offset in an interleaved output plane, both in
/// floats.
fn interleaved_positions(g: &Geom) -> Vec<(usize, usize)> {
    (0..g.ho * g.wo)
        .map(|p| {
            let (y, x) = (p / g.wo * g.stride, p % g.wo * g.stride);
            ((y * (g.w + 2) + x) * LANES, p * LANES)
        })
        .collect()
}

/// A 3×3 convolution with padding 1 and images in the lanes: `src` [n, k, h, w] to [n, m, ho,
/// wo] (`(k, m)` channels) with the weights `taps` of [`taps_of`] read at `offsets` (in floats)
/// into the interleaved padded planes, plus `bias` [m]. Groups of [`LANES`] images run in
/// parallel. The input gradient calls it with `g` of stride 1, where ho × wo = h × w.
fn interleaved_conv(
    g: &Geom,
    (k, m): (usize, usize),
    src: &[f32],
    taps: &[f32],
    offsets: &[usize; 9],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (h, w, hw, hwo) = (g.h, g.w, g.h * g.w, g.hw_out());
    let plane = (h + 2) * (w + 2) * LANES;
    let positions = interleaved_positions(g);
    // Tiles of VECTORS positions in order; the last one repeats its last position to fill up
    // (it writes the same values twice).
    let tiles: Vec<direct::Tile> = positions
        .chunks(direct::VECTORS)
        .map(|p| direct::Tile {
            src: std::array::from_fn(|q| p[q.min(p.len() - 1)].0),
            out: std::array::from_fn(|q| p[q.min(p.len() - 1)].1),
        })
        .collect();
    let n = src.len() / (k * hw);
    built_in_pieces(n * m * hwo, LANES * m * hwo, |group, dst| {
        let images = LANES.min(n - group * LANES);
        let src = &src[group * LANES * k * hw..][..images * k * hw];
        with_scratch(|s| {
            let padded = resized(&mut s.cols, k * plane);
            super::vectorized(|| interleave(src, k, h, w, 1, padded));
            let out = resized(&mut s.mat, m * hwo * LANES);
            direct::run(m, k, taps, offsets, padded, plane, &tiles, hwo * LANES, out);
            super::vectorized(|| deinterleave(out, images, m, hwo, bias, dst));
        })
    })
}

/// The tap offsets (in floats) of an interleaved plane padded by one, w + 2 positions wide:
/// tap (ki, kj) of the forward pass, or with `flipped` tap (2 - ki, 2 - kj) (the input
/// gradient's).
fn interleaved_offsets(w: usize, flipped: bool) -> [usize; 9] {
    std::array::from_fn(|t| {
        let (ki, kj) = if flipped { (2 - t / 3, 2 - t % 3) } else { (t / 3, t % 3) };
        (ki * (w + 2) + kj) * LANES
    })
}

/// The weight [o, c, 3, 3] as the direct kernel reads it: for the forward pass the input
/// channels are its `k` = c and the output channels its `m` = o, or with `transposed` (the input
/// gradient) the other way round. Laid out as [m / CHANNELS][9][k][CHANNELS]: for each block of
/// [`direct::CHANNELS`] output channels, each tap and each input row, the block's weights side
/// by side (zeros past the last channel).
///
/// Why blocks: a tile reads one block's weights through all taps and input channels; with the
/// block contiguous (9·k·8 values, 36 KB at 128 channels) they stay in L1 across the tiles,
/// where rows of all m channels put each broadcast on a cache line of its own.
fn taps_of(weight: &[f32], o: usize, c: usize, transposed: bool) -> Vec<f32> {
    let (k, m) = if transposed { (o, c) } else { (c, o) };
    let bw = direct::CHANNELS;
    let block = 9 * k * bw;
    // Block by block in parallel, each written in order (a gather from the weight). One pass
    // over the weight with scattered writes took 0.28 ms (0.48–0.52 transposed) for 128 × 128
    // channels on one thread while the other waited, twice per layer and step; now 0.17 ms on
    // one thread, 0.09 on two.
    built_in_pieces(m.div_ceil(bw) * block, block, |blk, taps| {
        for t in 0..9 {
            for row in 0..k {
                taps.extend((0..bw).map(|j| {
                    let col = blk * bw + j;
                    let (oc, ic) = if transposed { (row, col) } else { (col, row) };
                    if col < m {
                        weight[(oc * c + ic) * 9 + t]
                    } else {
                        0.0
                    }
                }));
            }
        }
    })
}

/// One image of a same-size 3×3 convolution: `src` [k, h, w] to `dst` [m, h, w] (`(k, m)`
/// channels) with the weights `taps` of [`taps_of`] read at `offsets` into the padded planes, plus
/// `bias` [m].
///
/// Laid out with its zero border, a plane read from offset `ki·(w+2) + kj` is tap (ki, kj)'s
/// input for every output position at once, in output rows `w + 2` wide (the two extra columns
/// are computed and dropped).
fn shifted_image(
    g: &Geom,
    (k, m): (usize, usize),
    src: &[f32],
    taps: &[f32],
    offsets: &[usize; 9],
    bias: Option<&[f32]>,
    dst: &mut Piece<'_>,
) {
    let (h, w, wp) = (g.h, g.w, g.w + 2);
    let plane = (h + 2) * wp;
    let rows = h * wp;
    let cols = rows.next_multiple_of(direct::POSITIONS);
    with_scratch(|s| {
        // The padded planes and, past the last one, what the last tile's reads run over.
        let padded = resized(&mut s.cols, k * plane + (cols - rows) + 2);
        super::vectorized(|| {
            padded.fill(0.0);
            layers::pad_planes(padded, src, h, w, 1);
        });
        let out = resized(&mut s.mat, m * cols);
        let tiles: Vec<direct::Tile> = (0..cols)
            .step_by(direct::POSITIONS)
            .map(|j0| {
                let at = std::array::from_fn(|q| j0 + 16 * q);
                direct::Tile { src: at, out: at }
            })
            .collect();
        direct::run(m, k, taps, offsets, padded, plane, &tiles, cols, out);
        super::vectorized(|| {
            for (ch, out) in out.chunks_exact(cols).enumerate() {
                let b = bias.map_or(0.0, |b| b[ch]);
                for row in out.chunks_exact(wp).take(h) {
                    dst.extend(row[..w].iter().map(|v| v + b));
                }
            }
        });
    })
}

/// The direct convolution kernel behind [`shifted_image`] and [`interleaved_conv`], in AVX-512.
mod direct {
    /// 16-lane registers of outputs in one tile (16 positions of one image, or one position of
    /// 16 images).
    pub(super) const VECTORS: usize = 3;
    /// Output positions of one tile.
    pub(super) const POSITIONS: usize = VECTORS * 16;
    /// Output channels of one tile: 8 × 3 accumulators, 3 loaded inputs and a broadcast weight
    /// fill 28 of the 32 registers. Against 6 × 4 no difference showed through this machine's
    /// noise; this shape leaves no narrow tile for the usual channel counts (multiples of 8), and
    /// a 16×16 plane's 16·18 positions fill whole tiles.
    pub(super) const CHANNELS: usize = 8;

    pub(super) fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Where one tile reads its [`VECTORS`] input vectors (offsets into an input channel's plane,
    /// to which each tap's offset is added) and writes its output vectors (offsets into an
    /// output channel's values).
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Tile {
        pub(super) src: [usize; VECTORS],
        pub(super) out: [usize; VECTORS],
    }

    /// For each tile and output channel r: `out`[r·out_stride + tile.out[q]..][..16] = Σ over
    /// taps t and input channels c of `taps`[r / CHANNELS][t][c][r % CHANNELS] times `src`[c·plane + offsets[t] +
    /// tile.src[q]..][..16]. Each output is summed in the same order (taps, then channels)
    /// whatever the tile or thread.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        m: usize,
        k: usize,
        taps: &[f32],
        offsets: &[usize; 9],
        src: &[f32],
        plane: usize,
        tiles: &[Tile],
        out_stride: usize,
        out: &mut [f32],
    ) {
        assert!(available(), "the direct convolution needs AVX-512");
        assert!(taps.len() >= m.div_ceil(CHANNELS) * CHANNELS * 9 * k, "direct convolution: too few weights");
        let reach = offsets.iter().max().copied().unwrap_or(0) + 16;
        for t in tiles {
            for (&s, &o) in t.src.iter().zip(&t.out) {
                assert!(k == 0 || src.len() >= (k - 1) * plane + reach + s, "direct convolution: input too short");
                assert!(m == 0 || out.len() >= (m - 1) * out_stride + o + 16, "direct convolution: output too short");
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (asserted above), and the asserts bound every read of
        // `taps` and `src` and every write of `out` that the tiles make.
        unsafe {
            x86::run(m, k, taps, offsets, src, plane, tiles, out_stride, out)
        }
    }

    /// `dw` [m, k, 9] = Σ over `images` and `positions` (s, d) of `dy`[image][o][d..][..16] times
    /// `src`[image][c·plane + offsets[t] + s..][..16], lane by lane (images `src_stride` apart in
    /// `src` and `m·dy_row` apart in `dy`, whose channels are `dy_row` apart). Each sum runs over
    /// images, then positions in 16 lanes, then the lanes, in the same order whatever the thread.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn weight_grad(
        m: usize,
        k: usize,
        images: usize,
        (dy, dy_row): (&[f32], usize),
        (src, src_stride, plane): (&[f32], usize, usize),
        positions: &[(usize, usize)],
        offsets: &[usize; 9],
        dw: &mut [f32],
    ) {
        assert!(available(), "the direct convolution needs AVX-512");
        assert!(m.is_multiple_of(GRAD_CHANNELS) && (9 * k).is_multiple_of(GRAD_TAPS));
        assert!(images == 0 || dy.len() >= images * m * dy_row, "direct weight gradient: dy too short");
        assert!(dw.len() >= m * k * 9, "direct weight gradient: dw too short");
        let reach = offsets.iter().max().copied().unwrap_or(0) + 16;
        for &(s, d) in positions {
            assert!(d + 16 <= dy_row, "direct weight gradient: a position past its dy row");
            assert!(
                images == 0 || k == 0 || src.len() >= (images - 1) * src_stride + (k - 1) * plane + reach + s,
                "direct weight gradient: input too short"
            );
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present, and the asserts above bound every access of the tiles.
        unsafe {
            x86::weight_grad(m, k, images, (dy, dy_row), (src, src_stride, plane), positions, offsets, dw)
        }
    }

    /// The weight gradient's tile: 4 output channels × 4 (input channel, tap) pairs, 16
    /// accumulators.
    ///
    /// Why not 4 × 6 (24 accumulators, fewer loads per FMA): with 4 outputs and 6 inputs loaded
    /// that is 34 registers when the compiler hoists all loads of a position ahead of its FMAs,
    /// and some builds did, keeping accumulators on the stack (32×32 and 16×16 layers 10.9–11.4
    /// ms against 7.0–7.5 from a build that did not). 4 × 4 needs 24 registers however the
    /// loads are scheduled, and measured 6.6–6.9 ms on those layers (4 × 3: 6.9–7.8).
    pub(super) const GRAD_CHANNELS: usize = 4;
    const GRAD_TAPS: usize = 4;

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::{Tile, CHANNELS, GRAD_CHANNELS, GRAD_TAPS, VECTORS};

        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn run(
            m: usize,
            k: usize,
            taps: &[f32],
            offsets: &[usize; 9],
            src: &[f32],
            plane: usize,
            tiles: &[Tile],
            out_stride: usize,
            out: &mut [f32],
        ) {
            // Output-channel tiles outermost, so that a tile's weights are reused across positions.
            for o0 in (0..m).step_by(CHANNELS) {
                for t in tiles {
                    let args = (o0, k, taps, offsets, src, plane, t);
                    // SAFETY: as for `run` (the caller's asserts bound every tile).
                    unsafe {
                        match m - o0 {
                            1 => tile::<1>(args, out_stride, out),
                            2 => tile::<2>(args, out_stride, out),
                            3 => tile::<3>(args, out_stride, out),
                            4 => tile::<4>(args, out_stride, out),
                            5 => tile::<5>(args, out_stride, out),
                            6 => tile::<6>(args, out_stride, out),
                            7 => tile::<7>(args, out_stride, out),
                            _ => tile::<CHANNELS>(args, out_stride, out),
                        }
                    }
                }
            }
        }

        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn weight_grad(
            m: usize,
            k: usize,
            images: usize,
            (dy, dy_row): (&[f32], usize),
            (src, src_stride, plane): (&[f32], usize, usize),
            positions: &[(usize, usize)],
            offsets: &[usize; 9],
            dw: &mut [f32],
        ) {
            let pairs = 9 * k;
            for o0 in (0..m).step_by(GRAD_CHANNELS) {
                for q0 in (0..pairs).step_by(GRAD_TAPS) {
                    let at: [usize; GRAD_TAPS] = std::array::from_fn(|i| (q0 + i) / 9 * plane + offsets[(q0 + i) % 9]);
                    // SAFETY: `o0 + 4 <= m`, `q0 + 4 <= 9k` (the caller asserts divisibility), and
                    // the caller's asserts bound the reads of every image and position.
                    unsafe {
                        let mut acc = [[_mm512_setzero_ps(); GRAD_TAPS]; GRAD_CHANNELS];
                        for im in 0..images {
                            let d = dy.as_ptr().add((im * m + o0) * dy_row);
                            let x = src.as_ptr().add(im * src_stride);
                            for &(s, j) in positions {
                                let a: [__m512; GRAD_CHANNELS] =
                                    std::array::from_fn(|r| _mm512_loadu_ps(d.add(r * dy_row + j)));
                                for (i, &at) in at.iter().enumerate() {
                                    let b = _mm512_loadu_ps(x.add(at + s));
                                    for (acc, a) in acc.iter_mut().zip(a) {
                                        acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
                                    }
                                }
                            }
                        }
                        // Stored whole before any lane is summed: reduced straight from the
                        // accumulators (in a loop the compiler did not unroll), they were kept in
                        // memory and stored after every FMA, which bounded the kernel by stores
                        // (on AMD Zen 4, 2.2× the forward pass's time; 0.95–1.05× without).
                        let mut sums = [0f32; GRAD_CHANNELS * GRAD_TAPS * 16];
                        for (r, acc) in acc.iter().enumerate() {
                            for (i, a) in acc.iter().enumerate() {
                                _mm512_storeu_ps(sums.as_mut_ptr().add((r * GRAD_TAPS + i) * 16), *a);
                            }
                        }
                        for (t, lanes) in sums.chunks_exact(16).enumerate() {
                            let (r, i) = (t / GRAD_TAPS, t % GRAD_TAPS);
                            dw[(o0 + r) * pairs + q0 + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes.as_ptr()));
                        }
                    }
                }
            }
        }

        type TileArgs<'a> = (usize, usize, &'a [f32], &'a [usize; 9], &'a [f32], usize, &'a Tile);

        /// Output channels `o0..o0 + MR` at the tile's vectors.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn tile<const MR: usize>(
            (o0, k, taps, offsets, src, plane, t): TileArgs<'_>,
            out_stride: usize,
            out: &mut [f32],
        ) {
            // SAFETY: the caller keeps `o0 + MR <= m` and every read of `src` and write of `out`
            // inside their lengths (see `direct::run`).
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); VECTORS]; MR];
                for (tap, &off) in offsets.iter().enumerate() {
                    let w_t = taps.as_ptr().add((o0 / CHANNELS * 9 + tap) * k * CHANNELS);
                    let s_t = src.as_ptr().add(off);
                    for c in 0..k {
                        let p = s_t.add(c * plane);
                        let v: [__m512; VECTORS] = std::array::from_fn(|q| _mm512_loadu_ps(p.add(t.src[q])));
                        let w = w_t.add(c * CHANNELS);
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let wr = _mm512_set1_ps(*w.add(r));
                            for (a, v) in acc.iter_mut().zip(v) {
                                *a = _mm512_fmadd_ps(wr, v, *a);
                            }
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let d = out.as_mut_ptr().add((o0 + r) * out_stride);
                    for (q, a) in acc.iter().enumerate() {
                        _mm512_storeu_ps(d.add(t.out[q]), *a);
                    }
                }
            }
        }
    }
}

/// The gradient of `images` images as an [o, images × positions] matrix.
fn gather_grad<'a>(g: &Geom, grad: &'a [f32], images: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if images == 1 {
        return grad;
    }
    let (hwo, nc) = (g.hw_out(), images * g.hw_out());
    let m = resized(buf, g.o * nc);
    for (im, grad) in grad.chunks_exact(g.image_out()).enumerate() {
        for (oc, grad) in grad.chunks_exact(hwo).enumerate() {
            m[oc * nc + im * hwo..][..hwo].copy_from_slice(grad);
        }
    }
    m
}

/// The input gradient [n, c, h, w] from the output gradient [n, o, ho, wo].
pub(crate) fn grad_input(g: &Geom, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    if g.n * g.image_in() == 0 {
        return Vec::new();
    }
    if interleaved(g) {
        // As for `shifted` below: the adjoint with the weight transposed and the taps reversed.
        let taps = taps_of(weight, g.o, g.c, true);
        return interleaved_conv(g, (g.o, g.c), grad, &taps, &interleaved_offsets(g.w, true), None);
    }
    if shifted(g) {
        // The same-size 3×3 convolution's adjoint is one too: dx[c, ·] = Σ over taps of
        // weight[·, ·, tap]ᵀ [c, o] · grad shifted the opposite way.
        let taps = taps_of(weight, g.o, g.c, true);
        let offsets: [usize; 9] = std::array::from_fn(|t| (2 - t / 3) * (g.w + 2) + 2 - t % 3);
        return built_in_pieces(g.n * g.image_in(), g.image_in(), |i, dx| {
            shifted_image(g, (g.o, g.c), &grad[i * g.image_out()..][..g.image_out()], &taps, &offsets, None, dx)
        });
    }
    let mut dx = vec![0f32; g.n * g.image_in()];
    let (ckk, b) = (g.ckk(), g.chunk_images());
    dx.par_chunks_mut(b * g.image_in()).enumerate().for_each(|(i, dx)| {
        with_scratch(|s| {
            let images = dx.len() / g.image_in();
            let nc = images * g.hw_out();
            let grad = &grad[i * b * g.image_out()..][..images * g.image_out()];
            let gm = gather_grad(g, grad, images, &mut s.mat);
            let cols = resized(&mut s.cols, ckk * nc);
            // cols = Wᵀ · grad: the weight read as [ckk, o].
            matmul(ckk, nc, g.o, cols, nc, false, weight, (1, ckk), gm, (nc, 1));
            col2im(g, cols, images, dx);
        })
    });
    dx
}

/// The weight gradient [o, c, k, k] from the input and the output gradient.
pub(crate) fn grad_weight(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let ckk = g.ckk();
    let chunks = g.chunks();
    let per_group = chunks.len().div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    if shifted(g) {
        let partials = chunks
            .par_chunks(per_group)
            .map(|group| {
                let (first, last) = (group[0].start, group[group.len() - 1].end);
                let x = &x[first * g.image_in()..last * g.image_in()];
                grad_weight_shifted(g, x, &grad[first * g.image_out()..last * g.image_out()])
            })
            .collect();
        return sum_in_order(partials, g.o * ckk);
    }
    let strided = interleaved_strided(g) && g.h * g.w >= STRIDED_WEIGHT_GRAD_MIN_PLANE;
    if (interleaved(g) && g.h * g.w >= INTERLEAVED_WEIGHT_GRAD_MIN_PLANE) || strided {
        return grad_weight_interleaved(g, x, grad);
    }
    let partials: Vec<Vec<f32>> = chunks
        .par_chunks(per_group)
        .map(|group| {
            with_scratch(|s| {
                let mut dw = vec![0f32; g.o * ckk];
                for (j, r) in group.iter().enumerate() {
                    let images = r.len();
                    let nc = images * g.hw_out();
                    let x = &x[r.start * g.image_in()..r.end * g.image_in()];
                    let cols_t = resized(&mut s.cols_t, ckk * nc);
                    im2col_t(g, x, images, &mut s.cols, cols_t);
                    let grad = &grad[r.start * g.image_out()..r.end * g.image_out()];
                    let gm = gather_grad(g, grad, images, &mut s.mat);
                    // dw += grad · colsᵀ, the transposed columns [nc, ckk] read row by row.
                    matmul(g.o, ckk, nc, &mut dw, ckk, j > 0, gm, (nc, 1), &s.cols_t[..ckk * nc], (ckk, 1));
                }
                dw
            })
        })
        .collect();
    sum_in_order(partials, g.o * ckk)
}

/// The sum of the weight gradient's partial sums (`len` values each), added in their fixed order:
/// each value is p0 + p1 + p2 + … whatever the thread count. Pieces of the sum run in parallel:
/// on one thread, adding VGG's eight partials of 128 × 128 × 9 values held the 2×2 layers'
/// weight gradient to 1.67× its one-thread speed on two (measured in turn at 2 threads: 4×4
/// layers 3.4–3.6 against 3.6–4.5 ms, 2×2 layers 1.1–1.3 against 1.2–1.7).
fn sum_in_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    const PIECE: usize = 1 << 14;
    let mut parts = partials.into_iter();
    let Some(mut dw) = parts.next() else { return vec![0f32; len] };
    let rest: Vec<Vec<f32>> = parts.collect();
    dw.par_chunks_mut(PIECE).enumerate().for_each(|(i, dw)| {
        for p in &rest {
            dw.iter_mut().zip(&p[i * PIECE..]).for_each(|(d, p)| *d += p);
        }
    });
    dw
}

/// Bytes of the interleaved inputs and output gradients that one task of
/// [`grad_weight_interleaved`] takes: as many groups of [`LANES`] images as fit (at least one),
/// so that a task's data stays in its core's L2 while every tile of the weight gradient reads it.
const WEIGHT_GRAD_TASK_BYTES: usize = 1 << 20;

/// The weight gradient of a 3×3 convolution with images in the lanes (the layers of
/// [`interleaved`] and [`interleaved_strided`]): each task interleaves its groups of [`LANES`]
/// images (inputs padded, output gradients not) and sums over them by [`direct::weight_grad`];
/// the tasks' sums are added in order. The tasks depend on the shapes only, so the result does not depend on the thread count.
fn grad_weight_interleaved(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (h, w, hwo) = (g.h, g.w, g.hw_out());
    let plane = (h + 2) * (w + 2) * LANES;
    let group_in = g.c * plane;
    let group_bytes = (group_in + g.o * hwo * LANES) * std::mem::size_of::<f32>();
    let groups = g.n.div_ceil(LANES);
    let per_task = (WEIGHT_GRAD_TASK_BYTES / group_bytes).clamp(1, groups.max(1));
    let positions: Vec<(usize, usize)> = interleaved_positions(g);
    let offsets = interleaved_offsets(w, false);
    let partials = (0..groups.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let first = task * per_task;
            let n_groups = per_task.min(groups - first);
            let mut dw = vec![0f32; g.o * g.ckk()];
            with_scratch(|s| {
                let padded = resized(&mut s.cols, n_groups * group_in);
                let dy = resized(&mut s.mat, n_groups * g.o * hwo * LANES);
                super::vectorized(|| {
                    for (i, (padded, dy)) in
                        padded.chunks_exact_mut(group_in).zip(dy.chunks_exact_mut(g.o * hwo * LANES)).enumerate()
                    {
                        let (lo, hi) = ((first + i) * LANES, ((first + i + 1) * LANES).min(g.n));
                        interleave(&x[lo * g.image_in()..hi * g.image_in()], g.c, h, w, 1, padded);
                        interleave(&grad[lo * g.image_out()..hi * g.image_out()], g.o, g.ho, g.wo, 0, dy);
                    }
                });
                direct::weight_grad(
                    g.o,
                    g.c,
                    n_groups,
                    (dy, hwo * LANES),
                    (padded, group_in, plane),
                    &positions,
                    &offsets,
                    &mut dw,
                );
            });
            dw
        })
        .collect();
    sum_in_order(partials, g.o * g.ckk())
}

/// The weight gradient of a group of images by [`direct::weight_grad`]: the inputs padded as
/// for [`shifted_image`], the output gradient laid out in rows `w + 2` wide with zeros in the two
/// extra columns, so that the sum over padded positions is the sum over real ones.
fn grad_weight_shifted(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let images = x.len() / g.image_in().max(1);
    let (h, w, wp) = (g.h, g.w, g.w + 2);
    let (plane, rows) = ((h + 2) * wp, h * wp);
    let cols = rows.next_multiple_of(16);
    let x_stride = g.c * plane + (cols - rows) + 2;
    let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * wp + t % 3);
    let mut dw = vec![0f32; g.o * g.ckk()];
    with_scratch(|s| {
        let padded = resized(&mut s.cols, images * x_stride);
        let dy = resized(&mut s.mat, images * g.o * cols);
        super::vectorized(|| {
            padded.fill(0.0);
            dy.fill(0.0);
            for (p, x) in padded.chunks_exact_mut(x_stride).zip(x.chunks_exact(g.image_in())) {
                layers::pad_planes(p, x, h, w, 1);
            }
            for (d, grad) in dy.chunks_exact_mut(cols).zip(grad.chunks_exact(h * w)) {
                for (row, src) in d.chunks_exact_mut(wp).zip(grad.chunks_exact(w)) {
                    row[..w].copy_from_slice(src);
                }
            }
        });
        let positions: Vec<(usize, usize)> = (0..cols).step_by(16).map(|j| (j, j)).collect();
        direct::weight_grad(g.o, g.c, images, (dy, cols), (padded, x_stride, plane), &positions, &offsets, &mut dw);
    });
    dw
}

/// For a stride-1 convolution that keeps the image size (`k = 2·pad + 1`), the output positions
/// `lo..hi` (flattened over rows) that read the input at flattened offset `shift` from their own
/// position, for kernel tap (`ki`, `kj`); positions in `lo..hi` whose column falls off the
/// image are listed by `(ox_lo, ox_hi)`, the valid columns. `None` for other convolutions.
///
/// Such a convolution reads whole runs of rows at one fixed offset, so im2col and col2im move
/// one block per tap and image instead of one short piece per row: on the 8×8 to 2×2 layers a
/// row is 2 to 8 values and the per-piece cost dominated.
fn same_size_span(g: &Geom, ki: usize, kj: usize) -> Option<(Range<usize>, isize, (usize, usize))> {
    if g.stride != 1 || g.ho != g.h || g.wo != g.w {
        return None;
    }
    let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
    let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
    if oy_lo == oy_hi || ox_lo == ox_hi {
        return Some((0..0, 0, (ox_lo, ox_hi)));
    }
    let shift = (ki as isize - g.pad as isize) * g.w as isize + kj as isize - g.pad as isize;
    Some((oy_lo * g.w + ox_lo..(oy_hi - 1) * g.w + ox_hi, shift, (ox_lo, ox_hi)))
}

/// Zeroes the positions of `out` (one image's row of the column matrix) outside `span` and, in
/// it, those whose column lies outside `ox_lo..ox_hi`.
fn zero_outside(g: &Geom, out: &mut [f32], span: &Range<usize>, (ox_lo, ox_hi): (usize, usize)) {
    out[..span.start].fill(0.0);
    out[span.end..].fill(0.0);
    if ox_lo == 0 && ox_hi == g.wo {
        return;
    }
    // Column by column: a row's invalid stretch is one or two values, too short for a fill call.
    let rows = span.start / g.wo..span.end.div_ceil(g.wo);
    for col in (0..ox_lo).chain(ox_hi..g.wo) {
        for oy in rows.clone() {
            out[oy * g.wo + col] = 0.0;
        }
    }
}

/// [`im2col`] transposed: `cols_t` [images·ho·wo, c·k·k], one row per output position, written
/// directly (a transpose of the column matrix after the fact cost more than the product: on a
/// 32×32 layer the column matrix is nine times the input). Each input plane is first copied into
/// `padded` with its zero border, so every tap is a plain read.
fn im2col_t(g: &Geom, x: &[f32], images: usize, padded: &mut Vec<f32>, cols_t: &mut [f32]) {
    super::vectorized(|| {
        let (hp, wp, kk, ckk) = (g.h + 2 * g.pad, g.w + 2 * g.pad, g.k * g.k, g.ckk());
        let plane = resized(padded, hp * wp);
        plane.fill(0.0);
        for im in 0..images {
            for ci in 0..g.c {
                let src = &x[(im * g.c + ci) * g.h * g.w..][..g.h * g.w];
                layers::pad_planes(plane, src, g.h, g.w, g.pad);
                let rows_of = |oy: usize, ki: usize| &plane[(oy * g.stride + ki) * wp..][..wp];
                if g.k == 3 {
                    // Nine explicit reads per position: short copies would each be a call.
                    for oy in 0..g.ho {
                        let (r0, r1, r2) = (rows_of(oy, 0), rows_of(oy, 1), rows_of(oy, 2));
                        for ox in 0..g.wo {
                            let p = im * g.hw_out() + oy * g.wo + ox;
                            let out = &mut cols_t[p * ckk + ci * 9..][..9];
                            let x0 = ox * g.stride;
                            out[0] = r0[x0];
                            out[1] = r0[x0 + 1];
                            out[2] = r0[x0 + 2];
                            out[3] = r1[x0];
                            out[4] = r1[x0 + 1];
                            out[5] = r1[x0 + 2];
                            out[6] = r2[x0];
                            out[7] = r2[x0 + 1];
                            out[8] = r2[x0 + 2];
                        }
                    }
                    continue;
                }
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let p = im * g.hw_out() + oy * g.wo + ox;
                        let out = &mut cols_t[p * ckk + ci * kk..][..kk];
                        for ki in 0..g.k {
                            let row = rows_of(oy, ki);
                            for kj in 0..g.k {
                                out[ki * g.k + kj] = row[ox * g.stride + kj];
                            }
                        }
                    }
                }
            }
        }
    })
}

/// Input planes up to this many values are unfolded through a lookup table (see [`tap_table`]).
const SMALL_PLANE: usize = 64;

/// For each kernel tap (row-major over ki, kj) and output position, the input position it reads,
/// or `h·w` (a zero slot past the plane) where it falls on the padding. On the 8×8 to 1×1 layers
/// a row of the column matrix is a handful of values, and a gather through this table costs less
/// than the per-row bookkeeping of the copy loops.
fn tap_table(g: &Geom) -> Vec<u16> {
    let hw = g.h * g.w;
    let mut table = Vec::with_capacity(g.k * g.k * g.hw_out());
    for ki in 0..g.k {
        for kj in 0..g.k {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let (iy, ix) = (
                        (oy * g.stride + ki) as isize - g.pad as isize,
                        (ox * g.stride + kj) as isize - g.pad as isize,
                    );
                    let inside = (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                    table.push(if inside { (iy as usize * g.w + ix as usize) as u16 } else { hw as u16 });
                }
            }
        }
    }
    table
}

/// [`im2col`] for planes of at most [`SMALL_PLANE`] values.
fn im2col_small(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    let (hw, hwo, nc, kk) = (g.h * g.w, g.hw_out(), images * g.hw_out(), g.k * g.k);
    let table = tap_table(g);
    let mut plane = [0f32; SMALL_PLANE + 1];
    for ci in 0..g.c {
        for im in 0..images {
            plane[..hw].copy_from_slice(&x[(im * g.c + ci) * hw..][..hw]);
            plane[hw] = 0.0;
            for tap in 0..kk {
                let out = &mut cols[(ci * kk + tap) * nc + im * hwo..][..hwo];
                for (o, &i) in out.iter_mut().zip(&table[tap * hwo..(tap + 1) * hwo]) {
                    *o = plane[i as usize];
                }
            }
        }
    }
}

/// [`col2im`] for planes of at most [`SMALL_PLANE`] values: the same sums in the same order.
fn col2im_small(g: &Geom, cols: &[f32], images: usize, dx: &mut [f32]) {
    let (hw, hwo, nc, kk) = (g.h * g.w, g.hw_out(), images * g.hw_out(), g.k * g.k);
    let table = tap_table(g);
    let mut plane = [0f32; SMALL_PLANE + 1];
    for ci in 0..g.c {
        for im in 0..images {
            plane.fill(0.0);
            for tap in 0..kk {
                let src = &cols[(ci * kk + tap) * nc + im * hwo..][..hwo];
                for (v, &i) in src.iter().zip(&table[tap * hwo..(tap + 1) * hwo]) {
                    plane[i as usize] += v;
                }
            }
            dx[(im * g.c + ci) * hw..][..hw].copy_from_slice(&plane[..hw]);
        }
    }
}

/// Unfolds `images` images [images, c, h, w] into `cols` [c·k·k, images·ho·wo].
fn im2col(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    super::vectorized(|| im2col_any(g, x, images, cols))
}

fn im2col_any(g: &Geom, x: &[f32], images: usize, cols: &mut [f32]) {
    let (hw, hwo, nc) = (g.h * g.w, g.hw_out(), images * g.hw_out());
    if g.small() {
        return im2col_small(g, x, images, cols);
    }
    let (s, p) = (g.stride, g.pad);
    for ci in 0..g.c {
        for ki in 0..g.k {
            let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
            for kj in 0..g.k {
                let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &mut cols[r * nc..(r + 1) * nc];
                if let Some((span, shift, cols_ok)) = same_size_span(g, ki, kj) {
                    let from = (span.start as isize + shift) as usize..(span.end as isize + shift) as usize;
                    for im in 0..images {
                        let plane = &x[(im * g.c + ci) * hw..][..hw];
                        let out = &mut row[im * hwo..(im + 1) * hwo];
                        out[span.clone()].copy_from_slice(&plane[from.clone()]);
                        zero_outside(g, out, &span, cols_ok);
                    }
                    continue;
                }
                for im in 0..images {
                    let plane = &x[(im * g.c + ci) * hw..][..hw];
                    let out = &mut row[im * hwo..(im + 1) * hwo];
                    out[..oy_lo * g.wo].fill(0.0);
                    out[oy_hi * g.wo..].fill(0.0);
                    for oy in oy_lo..oy_hi {
                        let src = &plane[(oy * s + ki - p) * g.w..][..g.w];
                        let out = &mut out[oy * g.wo..(oy + 1) * g.wo];
                        out[..ox_lo].fill(0.0);
                        out[ox_hi..].fill(0.0);
                        if ox_lo == ox_hi {
                            continue;
                        }
                        let ix0 = ox_lo * s + kj - p;
                        let out = &mut out[ox_lo..ox_hi];
                        if s == 1 {
                            out.copy_from_slice(&src[ix0..ix0 + out.len()]);
                        } else {
                            for (j, o) in out.iter_mut().enumerate() {
                                *o = src[ix0 + j * s];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: folds `cols` back onto `dx` [images, c, h, w] (overwritten).
/// `cols` is scratch: the entries of positions that read outside the image are zeroed on the way.
fn col2im(g: &Geom, cols: &mut [f32], images: usize, dx: &mut [f32]) {
    super::vectorized(|| col2im_any(g, cols, images, dx))
}

fn col2im_any(g: &Geom, cols: &mut [f32], images: usize, dx: &mut [f32]) {
    let (hw, hwo, nc) = (g.h * g.w, g.hw_out(), images * g.hw_out());
    if g.small() {
        return col2im_small(g, cols, images, dx);
    }
    dx.fill(0.0);
    let (s, p) = (g.stride, g.pad);
    for ci in 0..g.c {
        for ki in 0..g.k {
            let (oy_lo, oy_hi) = g.valid(ki, g.h, g.ho);
            for kj in 0..g.k {
                let (ox_lo, ox_hi) = g.valid(kj, g.w, g.wo);
                if ox_lo == ox_hi {
                    continue;
                }
                let r = (ci * g.k + ki) * g.k + kj;
                let row = &mut cols[r * nc..(r + 1) * nc];
                if let Some((span, shift, cols_ok)) = same_size_span(g, ki, kj) {
                    let to = (span.start as isize + shift) as usize..(span.end as isize + shift) as usize;
                    for im in 0..images {
                        let plane = &mut dx[(im * g.c + ci) * hw..][..hw];
                        let src = &mut row[im * hwo..(im + 1) * hwo];
                        zero_outside(g, src, &span, cols_ok);
                        plane[to.clone()].iter_mut().zip(&src[span.clone()]).for_each(|(d, v)| *d += v);
                    }
                    continue;
                }
                for im in 0..images {
                    let plane = &mut dx[(im * g.c + ci) * hw..][..hw];
                    let src = &row[im * hwo..(im + 1) * hwo];
                    for oy in oy_lo..oy_hi {
                        let dst = &mut plane[(oy * s + ki - p) * g.w..][..g.w];
                        let src = &src[oy * g.wo + ox_lo..oy * g.wo + ox_hi];
                        let ix0 = ox_lo * s + kj - p;
                        if s == 1 {
                            dst[ix0..ix0 + src.len()].iter_mut().zip(src).for_each(|(d, v)| *d += v);
                        } else {
                            for (j, v) in src.iter().enumerate() {
                                dst[ix0 + j * s] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Deterministic values in [-1, 1) from a small xorshift generator.
    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;

    /// Output, input gradient and weight gradient of `sum(conv(x, w) * r)`.
    fn run(f: ConvFn, x: &Tensor, w: &Tensor, r: &Tensor, pad: usize, stride: usize) -> [Tensor; 3] {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = f(xv.as_tensor(), wv.as_tensor(), pad, stride).unwrap();
        let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(xv.as_tensor()).unwrap().clone();
        let gw = grads.get(wv.as_tensor()).unwrap().clone();
        [y, gx, gw]
    }

    #[test]
    fn matches_candle_forward_and_gradients() {
        // (n, cin, h, w, cout, k, pad, stride)
        let cases = [
            (1, 3, 8, 8, 5, 3, 1, 1),
            (3, 4, 7, 9, 6, 3, 1, 1),
            (2, 5, 9, 7, 3, 3, 1, 2),
            (2, 3, 6, 6, 4, 3, 0, 1),
            (3, 3, 9, 11, 2, 3, 0, 2),
            (2, 6, 5, 7, 4, 1, 0, 1),
            (4, 4, 9, 9, 7, 1, 0, 2),
            (1, 2, 3, 3, 3, 3, 1, 2),
            (1, 2, 1, 1, 3, 3, 1, 1),
            // Through the interleaved products (see `interleaved`): partial groups of images,
            // a last tile of positions filled up, output channels in narrower tiles; 4×4 and 2×2
            // planes keep `gemm` for the weight gradient, 8×8 ones take the interleaved one.
            (19, 8, 4, 4, 16, 3, 1, 1),
            (20, 16, 2, 2, 12, 3, 1, 1),
            (9, 8, 2, 3, 20, 3, 1, 1),
            // The interleaved forward pass at stride 2 (see `interleaved_strided`), odd sizes too,
            // and from 16×16 inputs up its weight gradient too.
            (18, 8, 8, 8, 12, 3, 1, 2),
            (3, 12, 9, 7, 8, 3, 1, 2),
            (18, 8, 16, 16, 12, 3, 1, 2),
            (3, 12, 17, 19, 8, 3, 1, 2),
            (33, 8, 8, 8, 12, 3, 1, 1),
            (5, 12, 8, 8, 8, 3, 1, 1),
            (17, 12, 7, 11, 20, 3, 1, 1),
            // Through the shifted products (see `shifted`).
            (3, 8, 16, 16, 12, 3, 1, 1),
            (2, 12, 18, 15, 12, 3, 1, 1),
        ];
        for (i, &(n, c, h, w, o, k, pad, stride)) in cases.iter().enumerate() {
            let x = random(&[n, c, h, w], 3 * i as u64 + 1);
            let wt = random(&[o, c, k, k], 3 * i as u64 + 2);
            let ho = (h + 2 * pad - k) / stride + 1;
            let wo = (w + 2 * pad - k) / stride + 1;
            let r = random(&[n, o, ho, wo], 3 * i as u64 + 3);
            let ours = run(conv2d, &x, &wt, &r, pad, stride);
            let reference = run(conv2d_candle, &x, &wt, &r, pad, stride);
            for (what, a, b) in [("output", 0, 0), ("input grad", 1, 1), ("weight grad", 2, 2)] {
                let d = max_rel_diff(&ours[a], &reference[b]);
                assert!(d < 1e-4, "case {:?}: {what} differs by {d}", cases[i]);
            }
        }
    }

    /// candle's own backward mishandles stride 2 when height and width leave different
    /// remainders, so such shapes are checked by the adjoint identities instead: the loss
    /// `sum(conv(x, w) * r)` is linear in x and in w, so it equals `sum(x * gx)` and `sum(w * gw)`.
    #[test]
    fn gradients_are_adjoint_for_uneven_strides() {
        for (i, &(n, c, h, w, o, k, pad)) in
            [(3, 3, 9, 8, 2, 3, 0), (2, 4, 8, 7, 5, 3, 1), (2, 3, 6, 5, 4, 1, 0), (17, 8, 17, 16, 12, 3, 1)]
                .iter()
                .enumerate()
        {
            let x = random(&[n, c, h, w], 40 + i as u64);
            let wt = random(&[o, c, k, k], 50 + i as u64);
            let (ho, wo) = ((h + 2 * pad - k) / 2 + 1, (w + 2 * pad - k) / 2 + 1);
            let r = random(&[n, o, ho, wo], 60 + i as u64);
            let [y, gx, gw] = run(conv2d, &x, &wt, &r, pad, 2);
            let dot = |a: &Tensor, b: &Tensor| (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            let loss = dot(&y, &r);
            assert!((dot(&x, &gx) - loss).abs() < 1e-4 * loss.abs().max(1.0), "case {i}: input gradient");
            assert!((dot(&wt, &gw) - loss).abs() < 1e-4 * loss.abs().max(1.0), "case {i}: weight gradient");
        }
    }

    #[test]
    fn bias_is_added_and_gets_its_gradient() {
        let (x, w, b) = (random(&[3, 4, 6, 5], 71), random(&[5, 4, 3, 3], 72), random(&[5], 73));
        let r = random(&[3, 5, 6, 5], 74);
        let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let vars = [&x, &w, &b].map(|t| Var::from_tensor(t).unwrap());
            let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor());
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y.clone(),
                g.get(vars[0].as_tensor()).unwrap().clone(),
                g.get(vars[1].as_tensor()).unwrap().clone(),
                g.get(vars[2].as_tensor()).unwrap().clone(),
            ]
        };
        let ours = grads(&|x, w, b| conv2d_bias(x, w, b, 1, 1).unwrap());
        let theirs = grads(&|x, w, b| {
            conv2d_candle(x, w, 1, 1).unwrap().broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap()
        });
        for k in 0..4 {
            assert!(max_rel_diff(&ours[k], &theirs[k]) < 1e-4, "result {k} differs");
        }
    }

    #[test]
    fn strided_inputs_are_read_through_their_layout() {
        let x = random(&[2, 3, 6, 5], 11).transpose(2, 3).unwrap();
        let w = random(&[4, 3, 3, 3], 12).transpose(2, 3).unwrap();
        let ours = conv2d(&x, &w, 1, 1).unwrap();
        let reference = conv2d_candle(&x, &w, 1, 1).unwrap();
        assert!(max_rel_diff(&ours, &reference) < 1e-4);
        // The op itself, fed a strided layout directly.
        let direct = x.apply_op2_no_bwd(&w, &Conv2d { padding: 1, stride: 1 }).unwrap();
        assert!(max_rel_diff(&direct, &reference) < 1e-4);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // Through im2col + gemm (stride 2), and through the interleaved products.
        for (size, stride) in [(10, 2), (8, 1)] {
            let x = random(&[37, 8, size, size], 21);
            let w = random(&[16, 8, 3, 3], 22);
            let out = (size - 1) / stride + 1;
            let r = random(&[37, 16, out, out], 23);
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| run(conv2d, &x, &w, &r, 1, stride))
                    .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let one = on(1);
            for threads in [2, 3, 5] {
                assert!(on(threads) == one, "stride {stride}: {threads} threads changed the result");
            }
        }
    }

    #[test]
    fn other_dtypes_fall_back_to_candle() {
        let x = random(&[1, 2, 5, 5], 31).to_dtype(DType::F64).unwrap();
        let w = random(&[3, 2, 3, 3], 32).to_dtype(DType::F64).unwrap();
        let y = conv2d(&x, &w, 1, 1).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[1, 3, 5, 5][..], DType::F64));
    }
}
