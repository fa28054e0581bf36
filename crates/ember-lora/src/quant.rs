//! Quantized frozen weights (QLoRA): block formats, quantizers, the fused CPU kernels, and the
//! custom autodiff op that multiplies by a quantized weight without ever holding it dequantized.
//!
//! A [`QuantMatrix`] keeps a frozen `[out, in]` weight as blocks over its row-major values,
//! exactly as the format stores them: GGUF's Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (the bytes of the file)
//! and bitsandbytes' NF4 (QLoRA's 4-bit NormalFloat with one f32 absmax per 64 values). Blocks
//! run over the flattened matrix, so a row need not be a whole number of blocks (bitsandbytes
//! blocks the flattened tensor the same way; GGUF's rows always are).
//!
//! The product `x·deq(W)ᵀ` and the input gradient `g·deq(W)` ([`QuantMatrix::matmul_transposed`],
//! [`QuantMatrix::matmul`]) dequantize one panel of the weight at a time into a cache-sized
//! buffer and multiply it there (gemm, one panel per thread); the whole weight never exists in
//! f32. [`EmberBackend`] is the extension-backend trait that makes this a burn op: CPU backends
//! run these kernels, GPU backends dequantize on the device and multiply, and `Autodiff<B>`
//! gives the op its own backward pass, which dequantizes again instead of saving anything.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use crate::attention::{
    device_attention_backward, device_attention_forward, host_backward, host_forward, place_of, to_device,
    AttentionSpec, HostTensors,
};
use crate::error::{LoraError, Result};
use crate::fused::{
    device_cross_entropy, device_lora_linear, device_lora_linear_backward, device_rms_norm, device_rms_norm_backward,
    device_rope, device_swiglu, device_swiglu_backward, host_cross_entropy, host_lora_linear, host_lora_linear_grad,
    host_rms_norm, host_rms_norm_grad, host_rope, host_swiglu, host_swiglu_grad, CrossEntropySpec, InputGrad,
    LoraGrads, LoraOperands, RotaryPairs,
};

/// bitsandbytes' NF4 code book (`get_4bit_type("nf4")`): the 16 levels of QLoRA's 4-bit
/// NormalFloat, quantiles of N(0, 1) scaled to [−1, 1] with an exact zero.
pub const NF4_CODE_BOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A block format of a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// GGUF Q8_0: 32 values, an f16 scale and 32 int8 codes (34 bytes).
    Q8_0,
    /// GGUF Q4_0: 32 values, an f16 scale and 32 4-bit codes offset by 8 (18 bytes).
    Q4_0,
    /// GGUF Q4_1: 32 values, f16 scale and minimum, 32 4-bit codes (20 bytes).
    Q4_1,
    /// GGUF Q4_K: 256 values in 8 sub-blocks with 6-bit scales and minimums (144 bytes).
    Q4K,
    /// GGUF Q6_K: 256 values in 16 sub-blocks with int8 scales, 6-bit codes (210 bytes).
    Q6K,
    /// bitsandbytes NF4: 64 values, an f32 absmax and 32 bytes of code-book indices, the first
    /// value of each pair in the high nibble (36 bytes; bitsandbytes keeps the absmax apart).
    Nf4,
    /// bfloat16 values, 32 to a block (64 bytes, little-endian; GGUF's BF16 layout): a bf16
    /// frozen base on a CPU backend without bf16 tensors (burn-ndarray). Multiplied on AMX
    /// tiles where the CPU has them ([`crate::amx`], activations rounded to bf16), else as f32.
    Bf16,
}

impl QuantFormat {
    /// Every quantized format (not [`QuantFormat::Bf16`], which only rounds).
    pub const ALL: [QuantFormat; 6] = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
        QuantFormat::Nf4,
    ];

    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1 => 32,
            QuantFormat::Q4K | QuantFormat::Q6K => 256,
            QuantFormat::Nf4 => 64,
            QuantFormat::Bf16 => 32,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q4K => 144,
            QuantFormat::Q6K => 210,
            QuantFormat::Nf4 => 36,
            QuantFormat::Bf16 => 64,
        }
    }

    /// The format's name as llama.cpp and bitsandbytes write it (`Q4_0`, `Q4_K`, `NF4`).
    pub const fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "Q8_0",
            QuantFormat::Q4_0 => "Q4_0",
            QuantFormat::Q4_1 => "Q4_1",
            QuantFormat::Q4K => "Q4_K",
            QuantFormat::Q6K => "Q6_K",
            QuantFormat::Nf4 => "NF4",
            QuantFormat::Bf16 => "BF16",
        }
    }

    /// The format of a ggml type id (`None` for float and unsupported types).
    pub const fn from_ggml(kind: u32) -> Option<Self> {
        match kind {
            2 => Some(QuantFormat::Q4_0),
            3 => Some(QuantFormat::Q4_1),
            8 => Some(QuantFormat::Q8_0),
            12 => Some(QuantFormat::Q4K),
            14 => Some(QuantFormat::Q6K),
            _ => None,
        }
    }

    /// The ggml type id (`None` for NF4, which GGUF does not have).
    pub const fn ggml_type(self) -> Option<u32> {
        match self {
            QuantFormat::Q4_0 => Some(2),
            QuantFormat::Q4_1 => Some(3),
            QuantFormat::Q8_0 => Some(8),
            QuantFormat::Q4K => Some(12),
            QuantFormat::Q6K => Some(14),
            QuantFormat::Nf4 => None,
            QuantFormat::Bf16 => Some(30),
        }
    }

    /// Bytes per stored value, scales included (Q4_0: 0.5625).
    pub fn bytes_per_value(self) -> f64 {
        self.block_bytes() as f64 / self.block_values() as f64
    }

    /// Whether [`QuantMatrix::quantize`] can write this format (the others are read from GGUF).
    pub const fn can_quantize(self) -> bool {
        matches!(
            self,
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Nf4 | QuantFormat::Bf16
        )
    }

    /// Values sharing one scale (and minimum) in the device layout ([`DeviceBlocks`]).
    const fn group(self) -> usize {
        match self {
            QuantFormat::Q6K => 16,
            QuantFormat::Nf4 => 64,
            _ => 32,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = String;

    /// `q8_0`, `q4_0`, `q4_1`, `q4_k`, `q6_k`, `nf4`, in any case.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        QuantFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("`{s}`: use one of q8_0, q4_0, q4_1, q4_k, q6_k, nf4"))
    }
}

fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Decodes one block of `format` into `out` (`format.block_values()` values).
fn decode_block(format: QuantFormat, b: &[u8], out: &mut [f32]) {
    match format {
        QuantFormat::Bf16 => {
            for (o, v) in out.iter_mut().zip(b.chunks_exact(2)) {
                *o = crate::amx::bf16_value(u16::from_le_bytes([v[0], v[1]]));
            }
        }
        QuantFormat::Q8_0 => {
            let d = f16_at(&b[0..2]);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
        QuantFormat::Q4_0 => {
            let d = f16_at(&b[0..2]);
            let (lo, hi) = out.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..18]) {
                *l = ((q & 0x0F) as i32 - 8) as f32 * d;
                *h = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantFormat::Q4_1 => {
            let (d, m) = (f16_at(&b[0..2]), f16_at(&b[2..4]));
            let (lo, hi) = out.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                *l = (q & 0x0F) as f32 * d + m;
                *h = (q >> 4) as f32 * d + m;
            }
        }
        QuantFormat::Q4K => {
            let (d, dmin) = (f16_at(&b[0..2]), f16_at(&b[2..4]));
            let scales = &b[4..16];
            for (chunk, q) in b[16..144].chunks_exact(32).enumerate() {
                let (s1, m1) = q4k_scale_min(scales, 2 * chunk);
                let (s2, m2) = q4k_scale_min(scales, 2 * chunk + 1);
                let (d1, min1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, min2) = (d * s2 as f32, dmin * m2 as f32);
                let out = &mut out[64 * chunk..64 * chunk + 64];
                for (l, &x) in q.iter().enumerate() {
                    out[l] = d1 * (x & 0x0F) as f32 - min1;
                    out[l + 32] = d2 * (x >> 4) as f32 - min2;
                }
            }
        }
        QuantFormat::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(&b[208..210]);
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                let out = &mut out[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let [q1, q2, q3, q4] = q6k_codes(ql, qh, l);
                    out[l] = d * (sc[is] as i8) as f32 * (q1 as i32 - 32) as f32;
                    out[l + 32] = d * (sc[is + 2] as i8) as f32 * (q2 as i32 - 32) as f32;
                    out[l + 64] = d * (sc[is + 4] as i8) as f32 * (q3 as i32 - 32) as f32;
                    out[l + 96] = d * (sc[is + 6] as i8) as f32 * (q4 as i32 - 32) as f32;
                }
            }
        }
        QuantFormat::Nf4 => {
            let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            for (pair, &q) in out.chunks_exact_mut(2).zip(&b[4..36]) {
                pair[0] = NF4_CODE_BOOK[(q >> 4) as usize] * absmax;
                pair[1] = NF4_CODE_BOOK[(q & 0x0F) as usize] * absmax;
            }
        }
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block `j` (llama.cpp's `get_scale_min_k4`).
fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q6_K's four 6-bit codes at `l`, `l+32`, `l+64`, `l+96` of a 128-value half block.
fn q6k_codes(ql: &[u8], qh: &[u8], l: usize) -> [u8; 4] {
    [
        (ql[l] & 0xF) | ((qh[l] & 3) << 4),
        (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
        (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
        (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
    ]
}

/// The first `n` values of row-major `blocks` of `format`, in f32; `None` when the blocks hold
/// fewer than `n` values.
pub fn dequantize_blocks(format: QuantFormat, blocks: &[u8], n: usize) -> Option<Vec<f32>> {
    let (bv, bb) = (format.block_values(), format.block_bytes());
    if blocks.len() < n.div_ceil(bv) * bb {
        return None;
    }
    let mut out = vec![0f32; n.div_ceil(bv) * bv];
    out.par_chunks_mut(bv)
        .zip(blocks.par_chunks_exact(bb))
        .for_each(|(o, b)| decode_block(format, b, o));
    out.truncate(n);
    Some(out)
}

/// Bytes that several weights share, e.g. a memory-mapped GGUF file.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a weight's blocks live.
enum BlockStore {
    /// Bytes of its own (quantized on load, or rows reordered).
    Owned(Vec<u8>),
    /// A range of a shared buffer: a GGUF base's blocks read in place from the mapped file, so
    /// that loading copies nothing and the page cache holds the only copy.
    Shared { buffer: SharedBytes, range: Range<usize> },
}

impl BlockStore {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Shared { buffer, range } => &(**buffer).as_ref()[range.clone()],
        }
    }
}

/// A frozen `[out, in]` weight held as quantized blocks.
pub struct QuantMatrix {
    format: QuantFormat,
    shape: [usize; 2],
    blocks: BlockStore,
    /// The device layout of the first non-CPU backend that used this weight.
    device: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantMatrix({} {:?}, {} bytes)",
            self.format,
            self.shape,
            self.blocks().len()
        )
    }
}

impl QuantMatrix {
    /// Wraps stored blocks of a `[out, in]` weight, checking their length.
    pub fn from_blocks(format: QuantFormat, shape: [usize; 2], blocks: Vec<u8>) -> Result<Self> {
        Self::new(format, shape, BlockStore::Owned(blocks))
    }

    /// Wraps blocks of a `[out, in]` weight that lie at `range` of a shared buffer (a mapped
    /// file), without copying them; checks that the range is inside the buffer and long enough.
    pub fn from_shared_blocks(
        format: QuantFormat,
        shape: [usize; 2],
        buffer: SharedBytes,
        range: Range<usize>,
    ) -> Result<Self> {
        let len = (*buffer).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(LoraError::InvalidQuantized {
                message: format!("{format} weight {shape:?}: bytes {range:?} are outside a buffer of {len}"),
            });
        }
        Self::new(format, shape, BlockStore::Shared { buffer, range })
    }

    fn new(format: QuantFormat, shape: [usize; 2], blocks: BlockStore) -> Result<Self> {
        let values = shape[0] * shape[1];
        let expected = values.div_ceil(format.block_values()) * format.block_bytes();
        let found = blocks.bytes().len();
        if found != expected {
            return Err(LoraError::InvalidQuantized {
                message: format!("{format} weight {shape:?} needs {expected} bytes of blocks, found {found}"),
            });
        }
        Ok(Self {
            format,
            shape,
            blocks,
            device: OnceLock::new(),
        })
    }

    /// Quantizes a row-major `[out, in]` f32 weight: Q8_0 and Q4_0 as llama.cpp's reference
    /// quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`), NF4 as bitsandbytes'
    /// `quantize_4bit` (absmax per 64 values, the nearest code-book level; a tie goes to the
    /// lower level, as bitsandbytes' decision tree does). A last partial block is padded with
    /// zeros.
    pub fn quantize(format: QuantFormat, values: &[f32], shape: [usize; 2]) -> Result<Self> {
        if values.len() != shape[0] * shape[1] {
            return Err(LoraError::InvalidQuantized {
                message: format!("{} values do not make a {shape:?} weight", values.len()),
            });
        }
        let (bv, bb) = (format.block_values(), format.block_bytes());
        let quantize_block: fn(&[f32], &mut [u8]) = match format {
            QuantFormat::Q8_0 => quantize_q8_0,
            QuantFormat::Q4_0 => quantize_q4_0,
            QuantFormat::Nf4 => quantize_nf4,
            QuantFormat::Bf16 => quantize_bf16,
            other => {
                return Err(LoraError::InvalidQuantized {
                    message: format!(
                        "Ember reads {other} from GGUF files but does not quantize to it; use q8_0, q4_0 or nf4"
                    ),
                })
            }
        };
        let n_blocks = values.len().div_ceil(bv);
        let mut blocks = vec![0u8; n_blocks * bb];
        blocks.par_chunks_mut(bb).enumerate().for_each(|(i, out)| {
            let start = i * bv;
            let end = (start + bv).min(values.len());
            let mut padded = [0f32; 256];
            padded[..end - start].copy_from_slice(&values[start..end]);
            quantize_block(&padded[..bv], out);
        });
        Self::from_blocks(format, shape, blocks)
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }

    /// The stored blocks.
    pub fn blocks(&self) -> &[u8] {
        self.blocks.bytes()
    }

    /// Whether the blocks are read in place from a shared buffer (a mapped file) rather than
    /// owned.
    pub fn is_shared(&self) -> bool {
        matches!(self.blocks, BlockStore::Shared { .. })
    }

    /// Bytes held (the blocks, owned or mapped).
    pub fn bytes(&self) -> usize {
        self.blocks().len()
    }

    /// Dequantizes `out.len()` values of the row-major weight starting at value `start`.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let (bv, bb) = (self.format.block_values(), self.format.block_bytes());
        let mut buf = [0f32; 256];
        let mut pos = start;
        let mut written = 0;
        let blocks = self.blocks();
        while written < out.len() {
            let block = pos / bv;
            let offset = pos - block * bv;
            let take = (bv - offset).min(out.len() - written);
            let bytes = &blocks[block * bb..(block + 1) * bb];
            if offset == 0 && take == bv {
                decode_block(self.format, bytes, &mut out[written..written + bv]);
            } else {
                decode_block(self.format, bytes, &mut buf[..bv]);
                out[written..written + take].copy_from_slice(&buf[offset..offset + take]);
            }
            pos += take;
            written += take;
        }
    }

    /// The whole weight in f32, row-major `[out, in]` (for merging and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let [rows, cols] = self.shape;
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
            self.dequantize_range(r * cols, row);
        });
        out
    }

    /// Rows `ids` of the weight in f32 (an embedding lookup), row-major `[ids.len(), in]`.
    pub fn rows(&self, ids: &[usize]) -> Vec<f32> {
        let cols = self.shape[1];
        let mut out = vec![0f32; ids.len() * cols];
        out.par_chunks_mut(cols.max(1)).zip(ids).for_each(|(row, &id)| {
            self.dequantize_range(id * cols, row);
        });
        out
    }

    /// A bf16 weight's values as 16-bit words, when the CPU multiplies them on AMX tiles
    /// (and the stored bytes are 2-aligned, as owned blocks are).
    fn amx_bf16(&self) -> Option<&[u16]> {
        if self.format != QuantFormat::Bf16 || !crate::amx::available() {
            return None;
        }
        // SAFETY: every bit pattern is a valid u16.
        let (head, words, _) = unsafe { self.blocks().align_to::<u16>() };
        let values = self.shape[0] * self.shape[1];
        (head.is_empty() && words.len() >= values).then(|| &words[..values])
    }

    /// Dequantizes rows `rows` × columns `cols` into `tile`, row-major `[rows.len(), cols.len()]`.
    fn dequantize_tile(&self, rows: Range<usize>, cols: Range<usize>, tile: &mut [f32]) {
        let width = cols.len();
        for (i, r) in rows.enumerate() {
            self.dequantize_range(r * self.shape[1] + cols.start, &mut tile[i * width..(i + 1) * width]);
        }
    }

    /// `x·deq(W)ᵀ`: the layer's forward product, a panel of [`PANEL_ROWS`] weight rows at a
    /// time, panels spread over the threads.
    ///
    /// # Shapes
    /// - `x`: row-major `[m, in]`; output: row-major `[m, out]`
    pub fn matmul_transposed(&self, x: &[f32], m: usize) -> Vec<f32> {
        let [n, k] = self.shape;
        assert_eq!(x.len(), m * k, "x is [m, in]");
        if let Some(w) = self.amx_bf16() {
            return crate::amx::matmul_transposed(x, m, w, self.shape);
        }
        let mut y = vec![0f32; m * n];
        let panels = n.div_ceil(PANEL_ROWS);
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..panels)
            .into_par_iter()
            .for_each_init(Vec::new, |tile: &mut Vec<f32>, p| {
                let rows = p * PANEL_ROWS..((p + 1) * PANEL_ROWS).min(n);
                let width = rows.len();
                tile.resize(width * k, 0.0);
                self.dequantize_tile(rows.clone(), 0..k, tile);
                let y_ptr = &y_ptr;
                // SAFETY: y is [m, n] row-major; this panel writes columns `rows` only, which no other
                // panel touches; x is [m, k] and the tile [width, k], both row-major and alive.
                unsafe {
                    gemm::gemm(
                        m,
                        width,
                        k,
                        y_ptr.0.add(rows.start),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        k as isize,
                        1,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        y
    }

    /// `g·deq(W)`: the gradient with respect to the layer's input, a strip of [`STRIP_COLS`]
    /// input columns per task (block-aligned), each strip walking the weight's rows in panels.
    ///
    /// # Shapes
    /// - `g`: row-major `[m, out]`; output: row-major `[m, in]`
    pub fn matmul(&self, g: &[f32], m: usize) -> Vec<f32> {
        let [n, k] = self.shape;
        assert_eq!(g.len(), m * n, "g is [m, out]");
        if let Some(w) = self.amx_bf16() {
            return crate::amx::matmul(g, m, w, self.shape);
        }
        let mut dx = vec![0f32; m * k];
        let strip = STRIP_COLS.div_ceil(self.format.block_values()) * self.format.block_values();
        let strips = k.div_ceil(strip);
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        (0..strips)
            .into_par_iter()
            .for_each_init(Vec::new, |tile: &mut Vec<f32>, s| {
                let cols = s * strip..((s + 1) * strip).min(k);
                let width = cols.len();
                let dx_ptr = &dx_ptr;
                for p in 0..n.div_ceil(PANEL_ROWS) {
                    let rows = p * PANEL_ROWS..((p + 1) * PANEL_ROWS).min(n);
                    tile.resize(rows.len() * width, 0.0);
                    self.dequantize_tile(rows.clone(), cols.clone(), tile);
                    // SAFETY: dx is [m, k] row-major; this strip writes columns `cols` only; g is
                    // [m, n] and the tile [rows, width], both row-major and alive.
                    unsafe {
                        gemm::gemm(
                            m,
                            width,
                            rows.len(),
                            dx_ptr.0.add(cols.start),
                            1,
                            k as isize,
                            p > 0,
                            g.as_ptr().add(rows.start),
                            1,
                            n as isize,
                            tile.as_ptr(),
                            1,
                            width as isize,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
        dx
    }

    /// The weight in the device layout: one byte code per value (four to a 32-bit word), a
    /// code-to-value table, and a scale and a minimum per group, `v = table[code]·scale + min`,
    /// which reproduces [`QuantMatrix::dequantize`] bit for bit.
    fn device_layout(&self) -> DeviceLayout {
        let [rows, cols] = self.shape;
        let values = rows * cols;
        let (bv, bb, group) = (
            self.format.block_values(),
            self.format.block_bytes(),
            self.format.group(),
        );
        let n_blocks = values.div_ceil(bv);
        let padded = n_blocks * bv;
        let mut codes = vec![0u8; padded];
        let groups = padded / group;
        let mut scales = vec![0f32; groups];
        let mut mins = vec![0f32; groups];
        let mut table = [0f32; 256];
        match self.format {
            QuantFormat::Q8_0 => table
                .iter_mut()
                .enumerate()
                .for_each(|(c, t)| *t = c as u8 as i8 as f32),
            QuantFormat::Q4_0 => table.iter_mut().enumerate().for_each(|(c, t)| *t = c as f32 - 8.0),
            QuantFormat::Q4_1 | QuantFormat::Q4K => table.iter_mut().enumerate().for_each(|(c, t)| *t = c as f32),
            QuantFormat::Q6K => table.iter_mut().enumerate().for_each(|(c, t)| *t = c as f32 - 32.0),
            QuantFormat::Nf4 => table[..16].copy_from_slice(&NF4_CODE_BOOK),
            QuantFormat::Bf16 => unreachable!("bf16 blocks go to a device as f32 values (device_dequantize)"),
        }
        for (i, b) in self.blocks().chunks_exact(bb).enumerate() {
            let codes = &mut codes[i * bv..(i + 1) * bv];
            let g0 = i * bv / group;
            match self.format {
                QuantFormat::Q8_0 => {
                    scales[g0] = f16_at(&b[0..2]);
                    codes.copy_from_slice(&b[2..34]);
                }
                QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                    let qs = if self.format == QuantFormat::Q4_0 {
                        &b[2..18]
                    } else {
                        &b[4..20]
                    };
                    scales[g0] = f16_at(&b[0..2]);
                    if self.format == QuantFormat::Q4_1 {
                        mins[g0] = f16_at(&b[2..4]);
                    }
                    for (j, &q) in qs.iter().enumerate() {
                        codes[j] = q & 0x0F;
                        codes[j + 16] = q >> 4;
                    }
                }
                QuantFormat::Q4K => {
                    let (d, dmin) = (f16_at(&b[0..2]), f16_at(&b[2..4]));
                    for (chunk, q) in b[16..144].chunks_exact(32).enumerate() {
                        for sub in 0..2 {
                            let (s, m) = q4k_scale_min(&b[4..16], 2 * chunk + sub);
                            scales[g0 + 2 * chunk + sub] = d * s as f32;
                            mins[g0 + 2 * chunk + sub] = -(dmin * m as f32);
                        }
                        for (l, &x) in q.iter().enumerate() {
                            codes[64 * chunk + l] = x & 0x0F;
                            codes[64 * chunk + l + 32] = x >> 4;
                        }
                    }
                }
                QuantFormat::Q6K => {
                    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                    let d = f16_at(&b[208..210]);
                    for half in 0..2 {
                        for l in 0..32 {
                            let c = q6k_codes(&ql[64 * half..], &qh[32 * half..], l);
                            for (j, code) in c.into_iter().enumerate() {
                                codes[128 * half + l + 32 * j] = code;
                            }
                        }
                    }
                    // Value v of the block has scale sc[v / 16] (the four quarter-rows of each
                    // half use sc[is + 2j] with is = l / 16, i.e. sub-block (128·half + l + 32j)/16).
                    for (s, &scale) in sc.iter().enumerate() {
                        scales[g0 + s] = d * (scale as i8) as f32;
                    }
                }
                QuantFormat::Nf4 => {
                    scales[g0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    for (j, &q) in b[4..36].iter().enumerate() {
                        codes[2 * j] = q >> 4;
                        codes[2 * j + 1] = q & 0x0F;
                    }
                }
                QuantFormat::Bf16 => unreachable!("checked above"),
            }
        }
        let words = codes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        DeviceLayout {
            words,
            scales,
            mins,
            table: table.to_vec(),
        }
    }
}

/// Weight rows dequantized per panel of the forward kernel (and per step of the backward one).
pub const PANEL_ROWS: usize = 64;
/// Input columns per task of the backward kernel (rounded up to whole blocks).
pub const STRIP_COLS: usize = 256;

struct SendPtr(*mut f32);
// SAFETY: the kernels hand each task a disjoint set of columns of the output.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// llama.cpp's `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_bf16(x: &[f32], out: &mut [u8]) {
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&crate::amx::bf16_bits(v).to_le_bytes());
    }
}

fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[0..2].copy_from_slice(&f16_bytes(d));
    for (o, &v) in out[2..34].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// llama.cpp's `quantize_row_q4_0_ref`: `d = m / −8` with `m` the value of largest magnitude,
/// `q = min(15, ⌊x / d + 8.5⌋)`, value `j` in the low nibble of byte `j`, value `j + 16` in its
/// high nibble.
fn quantize_q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[0..2].copy_from_slice(&f16_bytes(d));
    let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[2 + j] = code(x[j]) | (code(x[j + 16]) << 4);
    }
}

/// bitsandbytes' blockwise NF4 (`kQuantizeBlockwise` with `dQuantizeNF4`): `x · (1 / absmax)`
/// to its nearest code-book level, the first of each pair in the high nibble.
fn quantize_nf4(x: &[f32], out: &mut [u8]) {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    out[0..4].copy_from_slice(&absmax.to_le_bytes());
    let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
    for (o, pair) in out[4..36].iter_mut().zip(x.chunks_exact(2)) {
        *o = (nf4_code(pair[0] * inv) << 4) | nf4_code(pair[1] * inv);
    }
}

/// The index of the NF4 level nearest `v` (in [−1, 1]); exactly between two levels, the lower.
fn nf4_code(v: f32) -> u8 {
    let mut code = 0u8;
    for i in 0..15 {
        let mid = ((NF4_CODE_BOOK[i] as f64 + NF4_CODE_BOOK[i + 1] as f64) / 2.0) as f32;
        if v > mid {
            code = i as u8 + 1;
        }
    }
    code
}

/// [`QuantMatrix::device_layout`] on the host.
struct DeviceLayout {
    words: Vec<i32>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    table: Vec<f32>,
}

/// A quantized weight's device layout as tensors of backend `B` (uploaded once per weight).
struct DeviceBlocks<B: Backend> {
    words: Tensor<B, 1, Int>,
    scales: Tensor<B, 2>,
    mins: Tensor<B, 2>,
    table: Tensor<B, 1>,
}

impl<B: Backend> DeviceBlocks<B> {
    fn upload(w: &QuantMatrix, device: &B::Device) -> Self {
        let layout = w.device_layout();
        let groups = layout.scales.len();
        let n_words = layout.words.len();
        Self {
            words: Tensor::from_data(TensorData::new(layout.words, [n_words]), device),
            scales: Tensor::from_data(TensorData::new(layout.scales, [groups, 1]), device),
            mins: Tensor::from_data(TensorData::new(layout.mins, [groups, 1]), device),
            table: Tensor::from_data(TensorData::new(layout.table, [256]), device),
        }
    }

    /// `deq(W)` `[out, in]` in f32 on the device.
    fn dequantize(&self, shape: [usize; 2], group: usize) -> Tensor<B, 2> {
        let n_words = self.words.dims()[0];
        let bytes: Vec<Tensor<B, 1, Int>> = (0..4)
            .map(|k| {
                self.words
                    .clone()
                    .bitwise_right_shift_scalar((8 * k as i64).elem())
                    .bitwise_and_scalar(255i64.elem())
            })
            .collect();
        let codes = Tensor::stack::<2>(bytes, 1).reshape([n_words * 4]);
        let groups = self.scales.dims()[0];
        let values = self
            .table
            .clone()
            .select(0, codes)
            .reshape([groups, group])
            .mul(self.scales.clone())
            .add(self.mins.clone());
        values
            .reshape([groups * group])
            .narrow(0, 0, shape[0] * shape[1])
            .reshape(shape)
    }
}

/// `deq(W)` of `w` on `B`'s device: the device layout is uploaded the first time and kept with
/// the weight (for the first backend that asks; others upload a temporary copy).
pub(crate) fn device_dequantize<B: Backend>(w: &QuantMatrix, device: &B::Device) -> Tensor<B, 2> {
    if w.format == QuantFormat::Bf16 {
        // Loaders make bf16 blocks for CPU backends only; a device gets the values in f32.
        return Tensor::from_data(TensorData::new(w.dequantize(), w.shape), device);
    }
    let group = w.format.group();
    if w.device.get().is_none() {
        let _ = w.device.set(Box::new(DeviceBlocks::<B>::upload(w, device)));
    }
    match w.device.get().and_then(|b| b.downcast_ref::<DeviceBlocks<B>>()) {
        Some(blocks) => blocks.dequantize(w.shape, group),
        None => DeviceBlocks::<B>::upload(w, device).dequantize(w.shape, group),
    }
}

pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x·deq(W)ᵀ` with the fused CPU kernel, on any backend (through host memory).
///
/// # Shapes
/// - `x`: `[m, in]`; output: `[m, out]`
pub fn host_quant_linear<B: Backend>(x: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let (device, dtype) = (x.device(), x.dtype());
    let [m, _] = x.dims();
    let data = x.into_data().convert::<f32>();
    let y = w.matmul_transposed(data.as_slice::<f32>().expect("f32 data"), m);
    Tensor::<B, 2>::from_data(TensorData::new(y, [m, w.shape[0]]), (&device, dtype))
        .into_primitive()
        .tensor()
}

/// `g·deq(W)` with the fused CPU kernel, on any backend (through host memory).
///
/// # Shapes
/// - `g`: `[m, out]`; output: `[m, in]`
pub fn host_quant_input_grad<B: Backend>(g: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let g = float::<B, 2>(g);
    let (device, dtype) = (g.device(), g.dtype());
    let [m, _] = g.dims();
    let data = g.into_data().convert::<f32>();
    let dx = w.matmul(data.as_slice::<f32>().expect("f32 data"), m);
    Tensor::<B, 2>::from_data(TensorData::new(dx, [m, w.shape[1]]), (&device, dtype))
        .into_primitive()
        .tensor()
}

/// [`host_quant_linear`] reading the input in place where the backend's storage allows
/// (burn-ndarray: `into_data` copied element by element, half of a bf16 step).
///
/// # Shapes
/// - `x`: `[m, in]`; output: `[m, out]`
pub fn host_tensor_quant_linear<B: HostTensors>(x: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let place = place_of::<B>(&x);
    let (values, [m, _]) = B::host_f32::<2>(&x);
    let y = w.matmul_transposed(&values, m);
    to_device::<B, 2>(y, [m, w.shape[0]], &place)
}

/// [`host_quant_input_grad`] reading the gradient in place where the backend's storage allows.
///
/// # Shapes
/// - `g`: `[m, out]`; output: `[m, in]`
pub fn host_tensor_quant_input_grad<B: HostTensors>(g: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let place = place_of::<B>(&g);
    let (values, [m, _]) = B::host_f32::<2>(&g);
    let dx = w.matmul(&values, m);
    to_device::<B, 2>(dx, [m, w.shape[1]], &place)
}

/// `x·deq(W)ᵀ` on the device: dequantize (the packed codes stay on the device between calls),
/// then one matmul. The dequantized weight is a temporary of this call.
///
/// # Shapes
/// - `x`: `[m, in]`; output: `[m, out]`
pub fn device_quant_linear<B: Backend>(x: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let x = float::<B, 2>(x);
    let dtype = x.dtype();
    let weight = device_dequantize::<B>(w, &x.device()).cast(dtype);
    x.matmul(weight.transpose()).into_primitive().tensor()
}

/// `g·deq(W)` on the device (see [`device_quant_linear`]).
///
/// # Shapes
/// - `g`: `[m, out]`; output: `[m, in]`
pub fn device_quant_input_grad<B: Backend>(g: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let g = float::<B, 2>(g);
    let dtype = g.dtype();
    let weight = device_dequantize::<B>(w, &g.device()).cast(dtype);
    g.matmul(weight).into_primitive().tensor()
}

/// Ember's own operations on a burn backend (the extension-backend pattern): a linear layer
/// with a quantized frozen weight. CPU backends use the fused kernels of [`QuantMatrix`]
/// (the defaults); GPU backends dequantize on the device; `Autodiff<B>` adds the backward pass.
pub trait EmberBackend: Backend {
    /// Whether `t` is recorded in an autodiff graph: a leaf that requires a gradient or anything
    /// computed from one (burn's `is_require_grad` is true for such leaves only).
    fn is_tracked(t: &FloatTensor<Self>) -> bool {
        let _ = t;
        false
    }

    /// Whether a bf16 frozen base is held as host blocks ([`QuantFormat::Bf16`]) on `device`:
    /// CPU backends without bf16 tensors (burn-ndarray), whose bf16 products then run on AMX
    /// tiles where the CPU has them. Other backends store bf16 tensors.
    fn bf16_base_on_host(device: &Self::Device) -> bool {
        let _ = device;
        false
    }

    /// Whether the backend computes on this process's CPU threads (rayon's): its steps and
    /// forwards then run on a worker of [`crate::threads`]' pool. Device backends queue their
    /// work from the calling thread, and stay on it.
    fn kernels_on_host() -> bool {
        false
    }

    /// `x·deq(W)ᵀ`.
    ///
    /// # Shapes
    /// - `x`: `[m, in]`; `w`: `[out, in]`; output: `[m, out]`
    fn quant_linear(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        host_quant_linear::<Self>(x, w)
    }

    /// `g·deq(W)`: the input gradient of [`EmberBackend::quant_linear`].
    ///
    /// # Shapes
    /// - `g`: `[m, out]`; `w`: `[out, in]`; output: `[m, in]`
    fn quant_input_grad(g: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        host_quant_input_grad::<Self>(g, w)
    }

    /// Fused attention (see [`crate::attention`]): `softmax(softcap(q·kᵀ·scale) + mask)·v`
    /// with grouped key/value heads and optional sink logits.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, seq, head_dim]`; `k`: `[batch, kv_heads, keys, head_dim]`;
    ///   `v`: `[batch, kv_heads, keys, value_dim]`; `mask`: `[batch or 1, 1, seq, keys]`;
    ///   `sinks`: `[heads]`; output: `[batch, heads, seq, value_dim]`
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<FloatTensor<Self>>,
        sinks: Option<FloatTensor<Self>>,
        spec: AttentionSpec,
    ) -> FloatTensor<Self> {
        Self::fused_attention_forward(q, k, v, mask, sinks, spec).0
    }

    /// The output of [`EmberBackend::fused_attention`] and each row's log-sum-exp `[batch, heads, seq]`
    /// (what its backward pass needs). Default: burn's tensor ops (GPU backends).
    fn fused_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<FloatTensor<Self>>,
        sinks: Option<FloatTensor<Self>>,
        spec: AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        device_attention_forward::<Self>(q, k, v, mask, sinks, spec)
    }

    /// `(dq, dk, dv)` of [`EmberBackend::fused_attention`] from its output, log-sum-exp and the
    /// output's gradient. Default: burn's tensor ops (GPU backends).
    #[allow(clippy::too_many_arguments)]
    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: Option<FloatTensor<Self>>,
        sinks: Option<FloatTensor<Self>>,
        spec: AttentionSpec,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        device_attention_backward::<Self>(q, k, v, mask, sinks, spec, out, lse, d_out)
    }

    /// RMSNorm over the last dimension (see [`crate::fused::rms_norm`]). Default: burn's ops.
    ///
    /// # Shapes
    /// - `x`: `[rows, dim]`; `weight`: `[dim]`; output: `[rows, dim]`
    fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        device_rms_norm::<Self>(x, weight, eps)
    }

    /// `∂x` of [`EmberBackend::fused_rms_norm`] from the output's gradient. Default: burn's ops.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        d_out: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        device_rms_norm_backward::<Self>(x, weight, eps, d_out)
    }

    /// Rotary embedding (see [`crate::fused::rope`]), or with `transpose` its adjoint (the
    /// backward pass). Default: burn's ops.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch or 1, 1, seq, rotary]`
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        pairs: RotaryPairs,
        transpose: bool,
    ) -> FloatTensor<Self> {
        device_rope::<Self>(x, cos, sin, pairs, transpose)
    }

    /// `silu(gate)·up` (see [`crate::fused::swiglu`]). Default: burn's ops.
    ///
    /// # Shapes
    /// - `gate`, `up`: `[n]`; output: `[n]`
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        device_swiglu::<Self>(gate, up)
    }

    /// `(∂gate, ∂up)` of [`EmberBackend::fused_swiglu`]. Default: burn's ops.
    fn fused_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        device_swiglu_backward::<Self>(gate, up, d_out)
    }

    /// `x·Wᵀ + b + s·(x_a·Aᵀ)·Bᵀ` (see [`crate::fused::lora_linear`]).
    ///
    /// # Shapes
    /// - `x`, `x_adapter`: `[rows, in]`; `lora_a`: `[r, in]`; `lora_b`: `[out, r]`; output:
    ///   `[rows, out]`
    fn fused_lora_linear(
        x: FloatTensor<Self>,
        x_adapter: Option<FloatTensor<Self>>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        operands: LoraOperands<Self>,
    ) -> FloatTensor<Self> {
        Self::fused_lora_linear_forward(x, x_adapter, lora_a, lora_b, &operands).0
    }

    /// The output of [`EmberBackend::fused_lora_linear`] and `x_a·Aᵀ` `[rows, r]` (what its
    /// backward pass keeps). Default: burn's ops.
    fn fused_lora_linear_forward(
        x: FloatTensor<Self>,
        x_adapter: Option<FloatTensor<Self>>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        operands: &LoraOperands<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        device_lora_linear::<Self>(x, x_adapter, lora_a, lora_b, operands)
    }

    /// The gradients of [`EmberBackend::fused_lora_linear`] from the output's. Default: burn's ops.
    fn fused_lora_linear_backward(
        x_adapter: FloatTensor<Self>,
        lora_a: FloatTensor<Self>,
        lora_b: FloatTensor<Self>,
        low: FloatTensor<Self>,
        operands: &LoraOperands<Self>,
        d_out: FloatTensor<Self>,
        input: InputGrad,
    ) -> LoraGrads<Self> {
        device_lora_linear_backward::<Self>(x_adapter, lora_a, lora_b, low, operands, d_out, input)
    }

    /// Each row's `logsumexp(z) − z[y]` and, with `spec.gradient`, its gradient with respect
    /// to the logits (see [`crate::fused::device_cross_entropy`]); outside any autodiff graph.
    /// Default: burn's ops.
    ///
    /// # Shapes
    /// - `logits`: `[rows, vocab]`; `targets`: host `[rows]`; output: `[rows]`, `[rows, vocab]`
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: &[i64],
        spec: CrossEntropySpec,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        device_cross_entropy::<Self>(logits, targets, spec)
    }
}

/// Whether `t` is recorded in an autodiff graph (see [`EmberBackend::is_tracked`]).
pub fn is_tracked<B: EmberBackend, const D: usize>(t: &Tensor<B, D>) -> bool {
    B::is_tracked(&t.clone().into_primitive().tensor())
}

/// An autodiff backend whose inner backend has Ember's operations too (what training needs).
pub trait EmberAutodiffBackend:
    EmberBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: EmberBackend>
{
}

impl<B> EmberAutodiffBackend for B where
    B: EmberBackend + burn::tensor::backend::AutodiffBackend<InnerBackend: EmberBackend>
{
}

/// The CPU backends: the fused host kernels for quantized weights (the trait's defaults) and
/// attention.
macro_rules! host_ember_backend {
    ($($backend:ty),*) => {$(
        impl EmberBackend for $backend {
            fn kernels_on_host() -> bool {
                true
            }

            fn bf16_base_on_host(device: &Self::Device) -> bool {
                !<Self as Backend>::supports_dtype(device, burn::tensor::DType::BF16)
            }

            fn quant_linear(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
                host_tensor_quant_linear::<Self>(x, w)
            }

            fn quant_input_grad(g: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
                host_tensor_quant_input_grad::<Self>(g, w)
            }

            fn fused_attention_forward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                mask: Option<FloatTensor<Self>>,
                sinks: Option<FloatTensor<Self>>,
                spec: AttentionSpec,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                host_forward::<Self>(q, k, v, mask, sinks, spec)
            }

            fn fused_attention_backward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                mask: Option<FloatTensor<Self>>,
                sinks: Option<FloatTensor<Self>>,
                spec: AttentionSpec,
                out: FloatTensor<Self>,
                lse: FloatTensor<Self>,
                d_out: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                host_backward::<Self>(q, k, v, mask, sinks, spec, out, lse, d_out)
            }

            fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
                host_rms_norm::<Self>(x, weight, eps)
            }

            fn fused_rms_norm_backward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                eps: f64,
                d_out: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                host_rms_norm_grad::<Self>(x, weight, eps, d_out)
            }

            fn fused_rope(
                x: FloatTensor<Self>,
                cos: FloatTensor<Self>,
                sin: FloatTensor<Self>,
                pairs: RotaryPairs,
                transpose: bool,
            ) -> FloatTensor<Self> {
                host_rope::<Self>(x, cos, sin, pairs, transpose)
            }

            fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
                host_swiglu::<Self>(gate, up)
            }

            fn fused_swiglu_backward(
                gate: FloatTensor<Self>,
                up: FloatTensor<Self>,
                d_out: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                host_swiglu_grad::<Self>(gate, up, d_out)
            }

            fn fused_lora_linear_forward(
                x: FloatTensor<Self>,
                x_adapter: Option<FloatTensor<Self>>,
                lora_a: FloatTensor<Self>,
                lora_b: FloatTensor<Self>,
                operands: &LoraOperands<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                host_lora_linear::<Self>(x, x_adapter, lora_a, lora_b, operands)
            }

            fn fused_lora_linear_backward(
                x_adapter: FloatTensor<Self>,
                lora_a: FloatTensor<Self>,
                lora_b: FloatTensor<Self>,
                low: FloatTensor<Self>,
                operands: &LoraOperands<Self>,
                d_out: FloatTensor<Self>,
                input: InputGrad,
            ) -> LoraGrads<Self> {
                host_lora_linear_grad::<Self>(x_adapter, lora_a, lora_b, low, operands, d_out, input)
            }

            fn fused_cross_entropy(
                logits: FloatTensor<Self>,
                targets: &[i64],
                spec: CrossEntropySpec,
            ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
                host_cross_entropy::<Self>(logits, targets, spec)
            }
        }
    )*};
}

host_ember_backend!(burn::backend::NdArray<f32>, burn::backend::Flex);

#[cfg(feature = "wgpu")]
impl EmberBackend for burn::backend::Wgpu {
    fn quant_linear(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        device_quant_linear::<Self>(x, w)
    }
    fn quant_input_grad(g: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        device_quant_input_grad::<Self>(g, w)
    }
}

#[cfg(feature = "cuda")]
impl EmberBackend for burn::backend::Cuda<f32> {
    fn quant_linear(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        device_quant_linear::<Self>(x, w)
    }
    fn quant_input_grad(g: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
        device_quant_input_grad::<Self>(g, w)
    }
}

mod autodiff {
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::ops::FloatTensor;

    use super::{EmberBackend, QuantMatrix};
    use crate::attention::AttentionSpec;
    use crate::fused::{CrossEntropySpec, LoraOperands, RotaryPairs};

    /// The backward pass of [`EmberBackend::quant_linear`]: `∂L/∂x = g·deq(W)`, dequantizing
    /// again; the only state kept is the (shared) quantized weight. No weight gradient: the
    /// base is frozen.
    #[derive(Debug)]
    struct QuantLinearBackward;

    impl<B: EmberBackend> Backward<B, 1> for QuantLinearBackward {
        type State = Arc<QuantMatrix>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let weight = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| B::quant_input_grad(grad, &weight));
        }
    }

    impl<B: EmberBackend, C: CheckpointStrategy> EmberBackend for Autodiff<B, C> {
        fn is_tracked(t: &FloatTensor<Self>) -> bool {
            !t.node.requirement.is_none()
        }

        fn bf16_base_on_host(device: &Self::Device) -> bool {
            B::bf16_base_on_host(device)
        }

        fn kernels_on_host() -> bool {
            B::kernels_on_host()
        }

        fn quant_linear(x: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
            match QuantLinearBackward
                .prepare::<C>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(w.clone(), B::quant_linear(x.primitive, w)),
                OpsKind::UnTracked(prep) => prep.finish(B::quant_linear(x.primitive, w)),
            }
        }

        fn quant_input_grad(g: FloatTensor<Self>, w: &Arc<QuantMatrix>) -> FloatTensor<Self> {
            // Only ever called on gradients, outside the graph.
            Self::from_inner(B::quant_input_grad(Self::inner(g), w))
        }

        fn fused_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            mask: Option<FloatTensor<Self>>,
            sinks: Option<FloatTensor<Self>>,
            spec: AttentionSpec,
        ) -> FloatTensor<Self> {
            crate::attention::autodiff::attention::<B, C>(q, k, v, mask, sinks, spec)
        }

        // Outside the graph only (the tracked pass goes through `attention`).
        fn fused_attention_forward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            mask: Option<FloatTensor<Self>>,
            sinks: Option<FloatTensor<Self>>,
            spec: AttentionSpec,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (out, lse) = B::fused_attention_forward(
                Self::inner(q),
                Self::inner(k),
                Self::inner(v),
                mask.map(Self::inner),
                sinks.map(Self::inner),
                spec,
            );
            (Self::from_inner(out), Self::from_inner(lse))
        }

        fn fused_attention_backward(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            mask: Option<FloatTensor<Self>>,
            sinks: Option<FloatTensor<Self>>,
            spec: AttentionSpec,
            out: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            d_out: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (dq, dk, dv) = B::fused_attention_backward(
                Self::inner(q),
                Self::inner(k),
                Self::inner(v),
                mask.map(Self::inner),
                sinks.map(Self::inner),
                spec,
                Self::inner(out),
                Self::inner(lse),
                Self::inner(d_out),
            );
            (Self::from_inner(dq), Self::from_inner(dk), Self::from_inner(dv))
        }

        fn fused_rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
            crate::fused::autodiff::rms_norm::<B, C>(x, weight, eps)
        }

        fn fused_rope(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            pairs: RotaryPairs,
            transpose: bool,
        ) -> FloatTensor<Self> {
            crate::fused::autodiff::rope::<B, C>(x, cos, sin, pairs, transpose)
        }

        fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            crate::fused::autodiff::swiglu::<B, C>(gate, up)
        }

        fn fused_lora_linear(
            x: FloatTensor<Self>,
            x_adapter: Option<FloatTensor<Self>>,
            lora_a: FloatTensor<Self>,
            lora_b: FloatTensor<Self>,
            operands: LoraOperands<Self>,
        ) -> FloatTensor<Self> {
            crate::fused::autodiff::lora_linear::<B, C>(x, x_adapter, lora_a, lora_b, operands)
        }

        // Outside the graph only (the loss's hand-made gradient).
        fn fused_cross_entropy(
            logits: FloatTensor<Self>,
            targets: &[i64],
            spec: CrossEntropySpec,
        ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
            let (nll, grad) = B::fused_cross_entropy(Self::inner(logits), targets, spec);
            (Self::from_inner(nll), grad.map(Self::from_inner))
        }
    }
}

/// A quantized frozen weight as a module field: a constant of the module (no parameters, no
/// record), shared between clones.
#[derive(Debug, Clone)]
pub struct QuantizedWeight(pub Arc<QuantMatrix>);

impl fmt::Display for QuantizedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.0.format, self.0.shape)
    }
}

use burn::empty;
empty!(QuantizedWeight);

/// `x·deq(W)ᵀ` of any rank through [`EmberBackend::quant_linear`]; differentiable in `x`.
///
/// # Shapes
/// - `x`: `[..., in]`; output: `[..., out]`
pub fn quant_linear<B: EmberBackend, const D: usize>(x: Tensor<B, D>, w: &Arc<QuantMatrix>) -> Tensor<B, D> {
    let dims = x.dims();
    let [out, inp] = w.shape;
    let rows = dims[..D - 1].iter().product::<usize>();
    let x2 = x.reshape([rows, inp]).into_primitive().tensor();
    let y = float::<B, 2>(B::quant_linear(x2, w));
    let mut out_dims = dims;
    out_dims[D - 1] = out;
    y.reshape(out_dims)
}

/// `g·deq(W)` (the input gradient of a quantized linear layer, for hand-written backward passes).
///
/// # Shapes
/// - `g`: `[m, out]`; output: `[m, in]`
pub fn quant_input_grad<B: EmberBackend>(g: Tensor<B, 2>, w: &Arc<QuantMatrix>) -> Tensor<B, 2> {
    float::<B, 2>(B::quant_input_grad(g.into_primitive().tensor(), w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    fn reference_matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    /// Random blocks of any format, the f16 scale fields set to small finite values.
    fn random_blocks(format: QuantFormat, shape: [usize; 2], seed: u64) -> QuantMatrix {
        let n_blocks = (shape[0] * shape[1]).div_ceil(format.block_values());
        let mut s = seed;
        let mut blocks: Vec<u8> = (0..n_blocks * format.block_bytes())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        let scale_fields: &[usize] = match format {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => &[0],
            QuantFormat::Q4_1 | QuantFormat::Q4K => &[0, 2],
            QuantFormat::Q6K => &[208],
            QuantFormat::Nf4 | QuantFormat::Bf16 => &[],
        };
        for (i, block) in blocks.chunks_exact_mut(format.block_bytes()).enumerate() {
            for &at in scale_fields {
                let v = 0.001 + 0.0001 * (i % 7) as f32;
                block[at..at + 2].copy_from_slice(&f16_bytes(v));
            }
            if format == QuantFormat::Nf4 {
                block[0..4].copy_from_slice(&0.05f32.to_le_bytes());
            }
        }
        QuantMatrix::from_blocks(format, shape, blocks).unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// bf16 blocks: values rounded to nearest even on quantizing; products with their values
    /// on AMX tiles where the CPU has them (activations rounded to bf16, f32 sums), as f32
    /// otherwise. Shapes pad every tile dimension (rows, columns, k) and span several k chunks.
    #[test]
    fn bf16_blocks_multiply_as_their_values() {
        use crate::amx::{bf16_bits, bf16_value};
        let amx = crate::amx::available();
        println!("AMX: {amx}");
        let operand = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| if amx { bf16_value(bf16_bits(x)) } else { x })
                .collect()
        };
        // m < 16 reads the weight row by row (decoding), m ≥ 16 packs it into tiles.
        for (m, n, k) in [
            (1, 1, 1),
            (3, 70, 33),
            (33, 47, 70),
            (64, 32, 1056),
            (5, 100, 2080),
            (70, 1100, 40),
        ] {
            let values = random(n * k, 1);
            let w = QuantMatrix::quantize(QuantFormat::Bf16, &values, [n, k]).unwrap();
            assert_eq!(w.bytes(), (n * k).div_ceil(32) * 64);
            let deq = w.dequantize();
            for (d, v) in deq.iter().zip(&values) {
                assert!((d - v).abs() <= v.abs() / 256.0, "{v} rounded to {d}");
            }
            let x = random(m * k, 2);
            let y = w.matmul_transposed(&x, m);
            let bound = 1e-6 * k.max(n) as f32;
            let diff = max_diff(&y, &reference_matmul_t(&operand(&x), m, &deq, n, k));
            assert!(diff <= bound, "x·Wᵀ [{m}, {n}, {k}]: {diff} > {bound}");
            let g = random(m * n, 3);
            let dx = w.matmul(&g, m);
            let diff = max_diff(&dx, &reference_matmul_t(&operand(&g), m, &transposed(&deq, n, k), k, n));
            assert!(diff <= bound, "g·W [{m}, {n}, {k}]: {diff} > {bound}");
        }
    }

    /// `[rows, cols]` row-major values transposed to `[cols, rows]`.
    fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = values[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn the_kernels_equal_a_product_with_the_dequantized_weight() {
        // Rows not a multiple of the panel, columns not a multiple of the strip or of NF4's block.
        for (format, n, k) in [
            (QuantFormat::Q8_0, 70, 96),
            (QuantFormat::Q4_0, 130, 288),
            (QuantFormat::Q4_1, 65, 64),
            (QuantFormat::Q4K, 66, 512),
            (QuantFormat::Q6K, 3, 768),
            (QuantFormat::Nf4, 67, 100),
        ] {
            let w = random_blocks(format, [n, k], 1);
            let deq = w.dequantize();
            let m = 5;
            let x = random(m * k, 2);
            let y = w.matmul_transposed(&x, m);
            assert!(max_diff(&y, &reference_matmul_t(&x, m, &deq, n, k)) < 1e-5, "{format}");
            let g = random(m * n, 3);
            let dx = w.matmul(&g, m);
            // g·W = (Wᵀ·gᵀ)ᵀ: the reference with W transposed.
            assert!(
                max_diff(&dx, &reference_matmul_t(&g, m, &transposed(&deq, n, k), k, n)) < 1e-5,
                "{format}"
            );
        }
    }

    #[test]
    fn the_device_layout_dequantizes_bit_for_bit() {
        for format in QuantFormat::ALL {
            let w = random_blocks(format, [24, 256], 4);
            let device = Default::default();
            let on_device = device_dequantize::<NdArray>(&w, &device)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(on_device, w.dequantize(), "{format}");
        }
    }

    #[test]
    fn the_autodiff_op_gives_the_input_gradient_of_the_dense_product() {
        type B = Autodiff<NdArray>;
        let device = Default::default();
        let (n, k, m) = (40, 64, 3);
        let w = Arc::new(QuantMatrix::quantize(QuantFormat::Q4_0, &random(n * k, 5), [n, k]).unwrap());
        let dense = Tensor::<B, 2>::from_data(TensorData::new(w.dequantize(), [n, k]), &device);
        let x = Tensor::<B, 2>::from_data(TensorData::new(random(m * k, 6), [m, k]), &device).require_grad();
        let probe = Tensor::<B, 2>::from_data(TensorData::new(random(m * n, 7), [m, n]), &device);
        let quant = quant_linear(x.clone(), &w).mul(probe.clone()).sum().backward();
        let reference = x.clone().matmul(dense.transpose()).mul(probe).sum().backward();
        let (a, b) = (x.grad(&quant).unwrap(), x.grad(&reference).unwrap());
        let diff = max_diff(
            &a.to_data().to_vec::<f32>().unwrap(),
            &b.to_data().to_vec::<f32>().unwrap(),
        );
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn wrong_block_lengths_and_unquantizable_formats_are_errors() {
        let err = QuantMatrix::from_blocks(QuantFormat::Q4_0, [2, 32], vec![0; 35]).unwrap_err();
        assert!(err.to_string().contains("36 bytes"), "{err}");
        let err = QuantMatrix::quantize(QuantFormat::Q4K, &[0.0; 256], [1, 256]).unwrap_err();
        assert!(err.to_string().contains("Q4_K"), "{err}");
        assert_eq!("Q4_k".parse::<QuantFormat>().unwrap(), QuantFormat::Q4K);
    }
}
