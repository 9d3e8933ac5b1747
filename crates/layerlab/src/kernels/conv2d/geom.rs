//! A convolution's shapes ([`Geom`]), and how its batch is cut into chunks of images.

use std::ops::Range;

use candle_core::bail;

/// Images per chunk aim at this many output positions per matrix product.
const TARGET_COLUMNS: usize = 512;
/// Batches are cut into at least this many chunks (when they have that many images), so that
/// the cores share even the layers with tiny feature maps.
const MIN_CHUNKS: usize = 8;

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Geom {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) o: usize,
    pub(crate) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
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
    pub(super) fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    pub(super) fn hw_out(&self) -> usize {
        self.ho * self.wo
    }
    pub(super) fn image_in(&self) -> usize {
        self.c * self.h * self.w
    }
    pub(super) fn image_out(&self) -> usize {
        self.o * self.hw_out()
    }

    /// Images per chunk: a function of the shapes only.
    pub(super) fn chunk_images(&self) -> usize {
        let wanted = TARGET_COLUMNS.div_ceil(self.hw_out().max(1));
        wanted.min(self.n.div_ceil(MIN_CHUNKS)).max(1)
    }

    /// The image ranges of the chunks, in order.
    /// A 1×1 convolution at stride 1 without padding: one product per image, no unfolding.
    pub(super) fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    pub(super) fn chunks(&self) -> Vec<Range<usize>> {
        let b = self.chunk_images();
        (0..self.n.div_ceil(b)).map(|i| i * b..((i + 1) * b).min(self.n)).collect()
    }

    /// Output positions `lo..hi` along one axis whose input index `o * stride + kk - pad` lies
    /// inside `0..size`.
    pub(super) fn valid(&self, kk: usize, size: usize, out: usize) -> (usize, usize) {
        let lo = if kk >= self.pad { 0 } else { (self.pad - kk).div_ceil(self.stride) };
        let hi = if size + self.pad > kk { ((size + self.pad - kk - 1) / self.stride + 1).min(out) } else { 0 };
        (lo.min(hi), hi)
    }
}
