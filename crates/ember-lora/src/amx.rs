//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later), f32 accumulation.
//!
//! A frozen weight stored in bf16 ([`crate::QuantFormat::Bf16`]) multiplies activations rounded
//! to bf16 (to nearest, ties to even), as PyTorch's bf16 matmuls on CPU (oneDNN) and GPUs do.
//! One `tdpbf16ps` multiplies a 16 × 32 bf16 tile by a 32 × 16 one into 16 × 16 f32 sums; the
//! kernel keeps a 32 × 32 block of the output in four tile registers while it walks `k`.
//!
//! The right operand is packed per call into the tiles' pair-interleaved layout (`[k/2, n, 2]`
//! per 16-column panel), straight from the weight's stored `[out, in]` bf16 values: as `Wᵀ`
//! for the forward product `x·Wᵀ` and as `W` for the input gradient `g·W`, so one stored copy
//! serves both. Dimensions that are not multiples of the tiles are padded with zeros.
//!
//! [`available`] says whether the CPU and the OS allow AMX (Linux needs the process to ask for
//! the tile state once: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); callers fall
//! back to f32 products elsewhere.

use std::cell::Cell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::buffer::{unwritten, written, written_slice};

/// Rows of the output kept in tiles at once (two tiles of 16).
const BLOCK_M: usize = 32;
/// Columns of the output kept in tiles at once (two tiles of 16).
const BLOCK_N: usize = 32;
/// bf16 values of `k` per tile step.
const TILE_K: usize = 32;
/// Tile steps of `k` per pass over the rows in [`product_by_column_blocks`] (the packed panel
/// slice stays in L2).
const CHUNK_K_TILES: usize = 32;
/// Tile steps of `k` per part of [`product_split_k`] (2048 values of `k`).
const SPLIT_K_TILES: usize = 64;
/// The most bytes of partial outputs [`product`] takes [`product_split_k`] for.
const SPLIT_K_PARTIAL_BYTES: usize = 64 << 20;
/// Packed bytes of `B` up to which [`product`] packs it whole before the products (a small
/// model's layer weights; SmolLM2-135M's largest is 1.7 MiB).
const PREPACK_BYTES: usize = 4 << 20;
/// Row blocks of `A` per task of [`product_grouped`] (64 rows).
const TASK_ROW_BLOCKS: usize = 2;
/// Bytes of packed `B` per column group of [`product_grouped`]: a task walks one group per row
/// block, the group staying in L2 (a larger `B` is walked in several groups, as separate tasks).
const GROUP_BYTES: usize = 1 << 20;

/// Whether this CPU and OS run AMX bf16 tiles (checked once per process; the first call asks
/// Linux for the tile state). `EMBER_NO_AMX=1` turns it off.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("EMBER_NO_AMX").map_or(true, |v| v != "1") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    let leaf1 = __cpuid_count(1, 0);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    if !(amx_bf16 && amx_tile && osxsave) {
        return false;
    }
    // SAFETY: OSXSAVE is set, so xgetbv is enabled.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN), as its 16 bits.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Whether the CPU converts f32 to bf16 itself (`vcvtne2ps2bf16`, AVX512_BF16: every CPU with
/// AMX has it). It rounds as [`bf16_bits`] does (to nearest even, NaN kept quiet) except that
/// subnormal inputs (below 1.2e-38 in size) become zero, as in oneDNN's conversions.
fn converts_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows `[rows ≤ 32, cols]` of `x` (`stride` apart) rounded to bf16 into one row block of
/// left tiles: per 32 columns two 16 × 32 tiles (rows 0–15, then 16–31), zero past `rows`
/// and `cols`. With `factors`, row `r` is multiplied by `factors[r]` first (in f32, as a
/// separate pass of `x[j] *= f` would).
fn round_block(x: &[f32], rows: usize, cols: usize, stride: usize, factors: Option<&[f32]>, out: &mut [u16]) {
    assert!(
        rows <= BLOCK_M && out.len() >= cols.div_ceil(TILE_K) * 1024,
        "one row block of tiles"
    );
    assert!(rows == 0 || (rows - 1) * stride + cols <= x.len(), "rows out of bounds");
    assert!(factors.is_none_or(|f| f.len() >= rows), "one factor per row");
    #[cfg(target_arch = "x86_64")]
    if converts_bf16() {
        // SAFETY: the CPU has AVX512_BF16 and AVX512BW (checked); bounds asserted above.
        unsafe { round_block_converting(x, rows, cols, stride, factors, out) };
        return;
    }
    round_block_soft(x, rows, cols, stride, factors, out);
}

/// [`round_block`] with the CPU's conversion: 32 values per instruction, the padding past
/// `cols` written by the same stores (masked loads read zeros there).
///
/// # Safety
/// AVX512_BF16 and AVX512BW; the bounds [`round_block`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_block_converting(
    x: &[f32],
    rows: usize,
    cols: usize,
    stride: usize,
    factors: Option<&[f32]>,
    out: &mut [u16],
) {
    use std::arch::x86_64::*;
    if rows < BLOCK_M {
        out.fill(0);
    }
    let mask_of = |n: usize| -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    };
    for r in 0..rows {
        let src = x[r * stride..].as_ptr();
        let (half, row) = (r / 16, r % 16);
        let factor = _mm512_set1_ps(factors.map_or(1.0, |f| f[r]));
        for t in 0..cols.div_ceil(TILE_K) {
            let l0 = t * TILE_K;
            let left = cols - l0;
            // SAFETY: the masked loads read only columns < cols of row r (asserted in bounds);
            // the store writes the 32 values of tile row `row` inside `out` (asserted length).
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask_of(left), src.add(l0));
                let hi = _mm512_maskz_loadu_ps(mask_of(left.saturating_sub(16)), src.wrapping_add(l0 + 16));
                let packed = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, factor), _mm512_mul_ps(lo, factor));
                let dst = out.as_mut_ptr().add((t * 2 + half) * 512 + row * TILE_K);
                _mm512_storeu_si512(dst.cast(), std::mem::transmute::<__m512bh, __m512i>(packed));
            }
        }
    }
}

crate::simd::multiversion! {
    /// [`round_block`] in software rounding ([`bf16_bits`]), for CPUs without AVX512_BF16.
    fn round_block_soft(x: &[f32], rows: usize, cols: usize, stride: usize, factors: Option<&[f32]>, out: &mut [u16]) {
        debug_assert!(rows <= BLOCK_M);
        if rows < BLOCK_M || !cols.is_multiple_of(TILE_K) {
            out.fill(0);
        }
        for r in 0..rows {
            let src = &x[r * stride..r * stride + cols];
            let (half, row) = (r / 16, r % 16);
            let factor = factors.map_or(1.0, |f| f[r]);
            for (t, chunk) in src.chunks(TILE_K).enumerate() {
                let dst = &mut out[(t * 2 + half) * 512 + row * TILE_K..][..chunk.len()];
                dst.iter_mut().zip(chunk).for_each(|(d, &s)| *d = bf16_bits(s * factor));
            }
        }
    }
}

crate::simd::multiversion! {
    /// Rows `[rows, cols]` of `x` (`stride` apart) rounded to bf16 into `out` `[rows, cols]`.
    fn round_rows(x: &[f32], rows: usize, cols: usize, stride: usize, out: &mut [u16]) {
        for r in 0..rows {
            let src = &x[r * stride..r * stride + cols];
            let dst = &mut out[r * cols..(r + 1) * cols];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = bf16_bits(s));
        }
    }
}

crate::simd::multiversion! {
    /// `src` `[k, n]` (rows `stride` apart) rounded to bf16 into right panels of 16 columns
    /// (`k_tiles` tiles each): tile row `r` of tile `t`, column `j` of panel `p` holds
    /// `(B[32t + 2r, 16p + j], B[32t + 2r + 1, 16p + j])` as one word; zero past `k` and `n`.
    /// Whole pairs of 16 columns by the CPU's conversion where it has one ([`converts_bf16`]),
    /// the rest in software rounding ([`bf16_bits`]).
    fn pack_pairs(src: &[f32], k: usize, n: usize, stride: usize, k_tiles: usize, out: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        let converting = converts_bf16();
        let word = |lo: f32, hi: f32| bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16;
        for (p, panel) in out.chunks_exact_mut(k_tiles * 256).enumerate() {
            let n0 = p * 16;
            let width = 16.min(n.saturating_sub(n0));
            for pair in 0..k_tiles * 16 {
                let dst = &mut panel[(pair / 16) * 256 + (pair % 16) * 16..][..16];
                let (lo, hi) = (2 * pair, 2 * pair + 1);
                if width == 16 && hi < k {
                    let a: &[f32; 16] = src[lo * stride + n0..][..16].try_into().expect("16 values");
                    let b: &[f32; 16] = src[hi * stride + n0..][..16].try_into().expect("16 values");
                    #[cfg(target_arch = "x86_64")]
                    if converting {
                        // SAFETY: the CPU converts (checked above); the arrays are 64 bytes each.
                        unsafe { pair_words(a, b, dst.try_into().expect("16 words")) };
                        continue;
                    }
                    for j in 0..16 {
                        dst[j] = word(a[j], b[j]);
                    }
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = match (j < width && lo < k, hi < k) {
                            (true, true) => word(src[lo * stride + n0 + j], src[hi * stride + n0 + j]),
                            (true, false) => word(src[lo * stride + n0 + j], 0.0),
                            (false, _) => 0,
                        };
                    }
                }
            }
        }
    }
}

/// `[a0, b0, a1, b1, …]` from `[a0 … a15, b0 … b15]` (16-bit lanes).
const INTERLEAVE: [i16; 32] = [
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
    31,
];

/// `out[j] = bf16(a[j]) | bf16(b[j]) << 16` by the CPU's conversion (see [`converts_bf16`]).
///
/// # Safety
/// AVX512_BF16 and AVX512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_words(a: &[f32; 16], b: &[f32; 16], out: &mut [u32; 16]) {
    use std::arch::x86_64::*;
    // SAFETY: each pointer covers 64 bytes (the arrays' sizes).
    unsafe {
        let packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(b.as_ptr()), _mm512_loadu_ps(a.as_ptr()));
        let order = _mm512_loadu_si512(INTERLEAVE.as_ptr().cast());
        let words = _mm512_permutexvar_epi16(order, std::mem::transmute::<__m512bh, __m512i>(packed));
        _mm512_storeu_si512(out.as_mut_ptr().cast(), words);
    }
}

thread_local! {
    /// The last [`LeftOperand`]'s buffer on this thread, reused by the next one: `resize` zeroes
    /// only what it adds, and [`round_block`] writes every value anyway (a fresh zeroed buffer per
    /// product was 1.2% of a bf16 training step in memset, 2026-12-07).
    static LEFT_BITS: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    /// [`product_grouped`]'s prepacked panels, reused the same way ([`RightOperand::pack_panel`]
    /// writes every word).
    static PACKED_PANELS: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// The left operand in bf16, `[m, k]` f32 rows rounded and laid out as tiles: per block of 32
/// rows, per 32 values of `k`, two contiguous 16 × 32 tiles (1 KiB each), zero padded.
struct LeftOperand {
    bits: Vec<u16>,
    /// Tile steps of `k` (`⌈k / 32⌉`).
    k_tiles: usize,
}

impl Drop for LeftOperand {
    fn drop(&mut self) {
        LEFT_BITS.set(std::mem::take(&mut self.bits));
    }
}

impl LeftOperand {
    fn round(x: &[f32], m: usize, k: usize) -> Self {
        let k_tiles = k.div_ceil(TILE_K);
        let block = k_tiles * 2 * 512;
        let mut bits = LEFT_BITS.take();
        // Old values stay where the buffer was longer: every block below overwrites them.
        bits.resize(m.div_ceil(BLOCK_M) * block, 0);
        bits.par_chunks_mut(block)
            .zip(x.par_chunks(BLOCK_M * k))
            .for_each(|(dst, src)| round_block(src, src.len() / k, k, k, None, dst));
        Self { bits, k_tiles }
    }

    /// The first tile of row block `mb`.
    fn block(&self, mb: usize) -> *const u16 {
        self.bits[mb * self.k_tiles * 1024..].as_ptr()
    }
}

/// How the right operand `B` `[k, n]` is read from a stored `[rows, cols]` bf16 matrix `W`.
#[derive(Clone, Copy)]
enum RightOperand<'a> {
    /// `B = Wᵀ` (`k` = W's columns, `n` = W's rows): the forward product `x·Wᵀ`.
    Transposed { w: &'a [u16], cols: usize },
    /// `B = W` (`k` = W's rows, `n` = W's columns): the input gradient `g·W`.
    Direct { w: &'a [u16], cols: usize },
}

impl<'a> RightOperand<'a> {
    /// `B`'s rows from `k0` on: `W`'s columns from `k0` (forward) or rows from `k0` (input
    /// gradient).
    fn rows_from(self, k0: usize) -> RightOperand<'a> {
        match self {
            RightOperand::Transposed { w, cols } => RightOperand::Transposed { w: &w[k0..], cols },
            RightOperand::Direct { w, cols } => RightOperand::Direct {
                w: &w[k0 * cols..],
                cols,
            },
        }
    }

    /// Packs columns `n0..n0 + 16` of `B` (zero past `n` or `k`) into `panel`, one
    /// 1024-byte tile per 32 values of `k`: tile row `r`, column `j` holds
    /// `(B[2r, j], B[2r + 1, j])` as one 32-bit word.
    fn pack_panel(self, n0: usize, n: usize, k: usize, panel: &mut [u32]) {
        let k_tiles = k.div_ceil(TILE_K);
        let panel = &mut panel[..k_tiles * 256];
        let pair = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
        match self {
            RightOperand::Transposed { w, cols } => {
                let full_rows = n0 + 16 <= n;
                for t in 0..k_tiles {
                    let tile = &mut panel[t * 256..(t + 1) * 256];
                    if full_rows && (t + 1) * TILE_K <= k {
                        // SAFETY: rows n0..n0 + 16 of W hold columns t·32..t·32 + 32 (checked just
                        // above), the tile 256 words; the CPU has AVX-512F (AMX implies it).
                        unsafe { transpose_tile(w[n0 * cols + t * TILE_K..].as_ptr(), cols, tile.as_mut_ptr()) };
                        continue;
                    }
                    tile.fill(0);
                    // B's column j is W's row n0 + j: its pairs of k go down the tile rows.
                    for j in 0..16.min(n.saturating_sub(n0)) {
                        let row = &w[(n0 + j) * cols..(n0 + j) * cols + k];
                        for r in 0..16 {
                            let lo = t * TILE_K + 2 * r;
                            if lo < k {
                                tile[r * 16 + j] = pair(row[lo], if lo + 1 < k { row[lo + 1] } else { 0 });
                            }
                        }
                    }
                }
            }
            RightOperand::Direct { w, cols } => {
                // Tile row r of pair p interleaves W's rows 2p and 2p + 1 at columns n0..n0 + 16.
                let width = 16.min(n.saturating_sub(n0));
                let fast = if width == 16 { k / 2 } else { 0 };
                if fast > 0 {
                    // SAFETY: pairs 0..fast read rows < k at columns n0..n0 + 16 < n + 1 of W
                    // `[k, cols]`, and write inside the panel; AMX implies AVX-512F.
                    unsafe { interleave_panel(w[n0..].as_ptr(), cols, fast, panel.as_mut_ptr()) };
                }
                for p in fast..k_tiles * 16 {
                    let dst = &mut panel[(p / 16) * 256 + (p % 16) * 16..][..16];
                    let (lo, hi) = (2 * p, 2 * p + 1);
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = if j < width && lo < k {
                            pair(w[lo * cols + n0 + j], if hi < k { w[hi * cols + n0 + j] } else { 0 })
                        } else {
                            0
                        };
                    }
                }
            }
        }
    }
}

/// Tile rows of pairs `0..pairs`: row `p` (at word `(p / 16)·256 + (p % 16)·16`) holds
/// `w[2p·stride + j] | w[(2p + 1)·stride + j] << 16` for `j < 16`.
///
/// # Safety
/// Rows `0..2·pairs` of 16 values readable at `w` (`stride` apart), the panel writable up to
/// pair `pairs`; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_panel(w: *const u16, stride: usize, pairs: usize, panel: *mut u32) {
    use std::arch::x86_64::*;
    for p in 0..pairs {
        // SAFETY: within the bounds the caller guarantees.
        unsafe {
            let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w.add(2 * p * stride).cast()));
            let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(w.add((2 * p + 1) * stride).cast()));
            let dst = panel.add((p / 16) * 256 + (p % 16) * 16);
            _mm512_storeu_si512(dst.cast(), _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi)));
        }
    }
}

/// Writes the 16 × 16 transpose of the 32-bit words `src[j·stride + 2i ..][..2]` (16 rows of
/// 32 bf16, `stride` bf16 apart) to `dst[i·16 + j]`: four rounds of AVX-512 shuffles.
///
/// # Safety
/// 16 rows of 32 bf16 readable at `src` (`stride` apart), 256 words writable at `dst`, and the
/// CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile(src: *const u16, stride: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: within the bounds the caller guarantees.
    unsafe {
        let r: [__m512i; 16] = std::array::from_fn(|j| _mm512_loadu_si512(src.add(j * stride).cast()));
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // u[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i + 4.
        let mut u = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for c in 0..4 {
            let x_lo = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
            let x_hi = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]);
            let y_lo = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
            let y_hi = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
            _mm512_storeu_si512(dst.add(c * 16).cast(), _mm512_shuffle_i32x4::<0x88>(x_lo, y_lo));
            _mm512_storeu_si512(dst.add((4 + c) * 16).cast(), _mm512_shuffle_i32x4::<0x88>(x_hi, y_hi));
            _mm512_storeu_si512(dst.add((8 + c) * 16).cast(), _mm512_shuffle_i32x4::<0xDD>(x_lo, y_lo));
            _mm512_storeu_si512(dst.add((12 + c) * 16).cast(), _mm512_shuffle_i32x4::<0xDD>(x_hi, y_hi));
        }
    }
}

/// The 64-byte tile configuration: palette 1; tiles 0–3 the 16 × 16 f32 output blocks, 4–5
/// the 16 × 32 bf16 left tiles, 6–7 the 16 pair-rows × 16 right tiles; all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Self(c)
    }
}

/// Tiles configured on this thread for the length of one task, released when dropped.
struct TileSession;

impl TileSession {
    /// # Safety
    /// [`available`] must have returned true.
    unsafe fn start() -> Self {
        let config = TileConfig::new();
        // SAFETY: AMX is available (the caller's contract); the config is 64 aligned bytes.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
        TileSession
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `start`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One 32 × 32 output block over tile steps `ts` of `k`: `C (+)= A[rows] · B[panels]`.
///
/// # Safety
/// Tiles configured ([`TileSession`]); `a` points at a row block of [`LeftOperand`] with
/// `ts.end` tile steps; `b0`/`b1` at packed panels with
/// `ts.end` tiles; `c` at 32 rows of 32 f32, `c_stride` bytes apart.
#[inline(always)]
unsafe fn block(
    a: *const u16,
    b0: *const u32,
    b1: *const u32,
    ts: std::ops::Range<usize>,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    // SAFETY (all blocks below): pointers and strides as the function's contract states.
    unsafe {
        let c_lo = c.cast::<u8>().add(16 * c_stride).cast::<f32>();
        if accumulate {
            asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) c, s = in(reg) c_stride, options(nostack, readonly));
            asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) c.add(16), s = in(reg) c_stride, options(nostack, readonly));
            asm!("tileloadd tmm2, [{p} + {s}*1]", p = in(reg) c_lo, s = in(reg) c_stride, options(nostack, readonly));
            asm!("tileloadd tmm3, [{p} + {s}*1]", p = in(reg) c_lo.add(16), s = in(reg) c_stride, options(nostack, readonly));
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for t in ts {
            asm!(
                // Loads between the products, so that they overlap the previous product.
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(t * 1024),
                a1 = in(reg) a.add(t * 1024 + 512),
                b0 = in(reg) b0.add(t * 256),
                b1 = in(reg) b1.add(t * 256),
                sa = in(reg) 64usize,
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c, s = in(reg) c_stride, options(nostack));
        asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c.add(16), s = in(reg) c_stride, options(nostack));
        asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c_lo, s = in(reg) c_stride, options(nostack));
        asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c_lo.add(16), s = in(reg) c_stride, options(nostack));
    }
}

/// A left operand `A` `[m, k]` rounded to bf16 and packed as [`LeftOperand`]'s tiles, for
/// products that run on the caller's thread (one attention head per task); the buffer is
/// reused from call to call.
#[derive(Debug, Default)]
pub(crate) struct LeftTiles {
    bits: Vec<u16>,
    /// Tile steps of `k`.
    k_tiles: usize,
    /// Blocks of 32 rows.
    m_blocks: usize,
}

impl LeftTiles {
    /// Packs `A` `[m, k]` with element `(i, l)` at `src[i·rs + l·cs]`, rounded to bf16.
    pub(crate) fn pack(&mut self, src: &[f32], m: usize, k: usize, (rs, cs): (usize, usize)) {
        self.pack_scaled(src, m, k, (rs, cs), None);
    }

    /// [`LeftTiles::pack`] of `diag(factors)·A`: row `i` multiplied by `factors[i]` in f32
    /// before it is rounded (rows read contiguously, `cs` = 1, when `factors` are given).
    pub(crate) fn pack_scaled(
        &mut self,
        src: &[f32],
        m: usize,
        k: usize,
        (rs, cs): (usize, usize),
        factors: Option<&[f32]>,
    ) {
        self.k_tiles = k.div_ceil(TILE_K);
        self.m_blocks = m.div_ceil(BLOCK_M);
        let block = self.k_tiles * 1024;
        if cs != 1 {
            // The element-wise path below writes only the values, not the padding.
            self.bits.clear();
        }
        // `round_block` writes whole blocks, padding included.
        self.bits.resize(self.m_blocks * block, 0);
        if m == 0 || k == 0 {
            return;
        }
        assert!((m - 1) * rs + (k - 1) * cs < src.len(), "left operand out of bounds");
        if let Some(factors) = factors {
            assert!(
                cs == 1 && factors.len() >= m,
                "row factors need contiguous rows, one factor each"
            );
        }
        if cs == 1 {
            for (mb, dst) in self.bits.chunks_exact_mut(block).enumerate() {
                let rows = BLOCK_M.min(m - mb * BLOCK_M);
                round_block(
                    &src[mb * BLOCK_M * rs..],
                    rows,
                    k,
                    rs,
                    factors.map(|f| &f[mb * BLOCK_M..]),
                    dst,
                );
            }
        } else {
            // A transposed read (a 64 × 64 block in the attention kernels): element by element.
            for i in 0..m {
                let row = (i / BLOCK_M) * block + ((i % BLOCK_M) / 16) * 512 + (i % 16) * TILE_K;
                for t in 0..self.k_tiles {
                    let l0 = t * TILE_K;
                    let dst = &mut self.bits[row + t * 1024..][..TILE_K.min(k - l0)];
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = bf16_bits(src[i * rs + (l0 + j) * cs]);
                    }
                }
            }
        }
    }

    fn block(&self, mb: usize) -> *const u16 {
        self.bits[mb * self.k_tiles * 1024..].as_ptr()
    }
}

/// A right operand `B` `[k, n]` rounded to bf16 and packed as 16-column panels (an even number
/// of them, zero padded), for products on the caller's thread; buffers reused between calls.
#[derive(Debug, Default)]
pub(crate) struct RightTiles {
    words: Vec<u32>,
    rounded: Vec<u16>,
    /// Tile steps of `k` per panel.
    k_tiles: usize,
    /// Panels of 16 columns (even).
    panels: usize,
}

impl RightTiles {
    /// Packs `src` `[rows, cols]` (rows `stride` apart) as `B = src` (`k` = rows, `n` = cols)
    /// or, `transposed`, as `B = srcᵀ` (`k` = cols, `n` = rows), rounded to bf16.
    pub(crate) fn pack(&mut self, src: &[f32], rows: usize, cols: usize, stride: usize, transposed: bool) {
        let (k, n) = if transposed { (cols, rows) } else { (rows, cols) };
        self.k_tiles = k.div_ceil(TILE_K);
        self.panels = n.div_ceil(BLOCK_N) * 2;
        self.words.clear();
        self.words.resize(self.panels * self.k_tiles * 256, 0);
        if rows == 0 || cols == 0 {
            return;
        }
        assert!((rows - 1) * stride + cols <= src.len(), "right operand out of bounds");
        if !transposed {
            pack_pairs(src, k, n, stride, self.k_tiles, &mut self.words);
            return;
        }
        self.rounded.clear();
        self.rounded.resize(rows * cols, 0);
        round_rows(src, rows, cols, stride, &mut self.rounded);
        let b = RightOperand::Transposed { w: &self.rounded, cols };
        let panel_len = self.k_tiles * 256;
        for (p, panel) in self.words.chunks_exact_mut(panel_len).enumerate() {
            b.pack_panel(p * 16, n, k, panel);
        }
    }

    fn panel(&self, p: usize) -> *const u32 {
        self.words[p * self.k_tiles * 256..].as_ptr()
    }
}

/// `C (+)= A·B` for the first `n` columns of `B`, on the caller's thread, over `A`'s `k` (`B`
/// may hold more rows of `k`: they meet `A`'s zero padding). `c` holds `A`'s rows rounded up
/// to 32 and `n` rounded up to 32 columns, rows `c_stride` floats apart; the padding is
/// written too.
///
/// # Panics
/// If AMX is not [`available`] or the operands do not fit.
pub(crate) fn tile_product(a: &LeftTiles, b: &RightTiles, n: usize, c: &mut [f32], c_stride: usize, accumulate: bool) {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    let n_blocks = n.div_ceil(BLOCK_N);
    assert!(
        b.k_tiles >= a.k_tiles && 2 * n_blocks <= b.panels,
        "right operand too small"
    );
    assert!(c_stride >= n_blocks * BLOCK_N, "output stride below the padded width");
    if a.m_blocks == 0 || n_blocks == 0 {
        return;
    }
    assert!(
        (a.m_blocks * BLOCK_M - 1) * c_stride + n_blocks * BLOCK_N <= c.len(),
        "output too small for the padded product"
    );
    if a.k_tiles == 0 {
        if !accumulate {
            for r in 0..a.m_blocks * BLOCK_M {
                c[r * c_stride..r * c_stride + n_blocks * BLOCK_N].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: AMX is available (asserted); every block lies inside `c` (asserted), the
    // operands hold `a.k_tiles` tile steps per row block and panel.
    unsafe {
        let _tiles = TileSession::start();
        // Along each row block, so that the output's rows are written a cache line after the
        // next (see `product_grouped`).
        for mb in 0..a.m_blocks {
            for nb in 0..n_blocks {
                let out = c.as_mut_ptr().add(mb * BLOCK_M * c_stride + nb * BLOCK_N);
                let (b0, b1) = (b.panel(2 * nb), b.panel(2 * nb + 1));
                block(a.block(mb), b0, b1, 0..a.k_tiles, out, c_stride * 4, accumulate);
            }
        }
    }
}

/// A raw pointer handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes its own columns of the output (see `product`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// `A·B` into a new row-major `[m, n]` f32 buffer: `a` `[m, k]` f32 rows, rounded to bf16.
///
/// Output blocks are walked along the output's rows ([`product_grouped`]): `B` up to
/// [`PREPACK_BYTES`] packed (a small model's layer weights) is packed whole first and the rows
/// split between tasks too; a wider one (an output head) is packed per column group by the task
/// that walks it. A `B` whose every pair of panels is over a quarter of [`GROUP_BYTES`] (`k` over
/// ~4k: the head's input gradient, a sum over the vocabulary) is split over `k` into partial
/// outputs ([`product_split_k`]) while those stay under [`SPLIT_K_PARTIAL_BYTES`], else walked a
/// column block per task with `k` in chunks ([`product_by_column_blocks`]).
///
/// # Panics
/// If AMX is not [`available`].
fn product(a: &[f32], m: usize, k: usize, n: usize, b: RightOperand<'_>) -> Vec<f32> {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    assert_eq!(a.len(), m * k, "a is [m, k]");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let pair_bytes = 2 * k.div_ceil(TILE_K) * 1024;
    if n.div_ceil(BLOCK_N) * pair_bytes <= PREPACK_BYTES {
        product_grouped(a, m, k, n, b, GROUP_BYTES, true)
    } else if 4 * pair_bytes <= GROUP_BYTES {
        product_grouped(a, m, k, n, b, GROUP_BYTES, false)
    } else if k.div_ceil(SPLIT_K_TILES * TILE_K) * m.next_multiple_of(BLOCK_M) * n.next_multiple_of(BLOCK_N) * 4
        <= SPLIT_K_PARTIAL_BYTES
    {
        product_split_k(a, m, k, n, b)
    } else {
        product_by_column_blocks(a, m, k, n, b)
    }
}

/// [`product`] for a long `k` and a small output (the output head's input gradient: `k` the
/// vocabulary, `[rows, hidden]` out): `k` split into parts of [`SPLIT_K_TILES`] tile steps, one
/// task per part packing its slice of `B` and multiplying its slice of `A` into a partial
/// output, the partials then added in order. `A` and `B` are each read once (walking column
/// blocks instead re-reads all of `A` per block: 18 × 33 MB for SmolLM2's head at 341 rows).
fn product_split_k(a: &[f32], m: usize, k: usize, n: usize, b: RightOperand<'_>) -> Vec<f32> {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    assert_eq!(a.len(), m * k, "a is [m, k]");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let left = LeftOperand::round(a, m, k);
    let k_tiles = left.k_tiles;
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK_M), n.div_ceil(BLOCK_N));
    let (rows, cols) = (m_blocks * BLOCK_M, n_blocks * BLOCK_N);
    let parts = k_tiles.div_ceil(SPLIT_K_TILES);
    // Each part's output padded to whole blocks, so that tiles store straight into it; every
    // block of every part is stored (no zeroing pass).
    let mut partial = unwritten(parts * rows * cols);
    partial
        .par_chunks_mut(rows * cols)
        .enumerate()
        .for_each_init(Vec::new, |panels: &mut Vec<u32>, (part, c)| {
            let t0 = part * SPLIT_K_TILES;
            let steps = SPLIT_K_TILES.min(k_tiles - t0);
            let (k0, len) = (t0 * TILE_K, (steps * TILE_K).min(k - t0 * TILE_K));
            let slice = b.rows_from(k0);
            // A worker's buffer from its previous part: `pack_panel` writes every word.
            panels.resize(n_blocks * 2 * steps * 256, 0);
            for (p, panel) in panels.chunks_exact_mut(steps * 256).enumerate() {
                slice.pack_panel(p * 16, n, len, panel);
            }
            // SAFETY: AMX is available (`product` asserted it).
            let _tiles = unsafe { TileSession::start() };
            for mb in 0..m_blocks {
                for nb in 0..n_blocks {
                    // SAFETY: row block mb of `left` holds k_tiles ≥ t0 + steps tile steps; the
                    // panels `steps` tiles each; the block lies inside this part's padded output.
                    unsafe {
                        let p0 = panels[2 * nb * steps * 256..].as_ptr();
                        let p1 = p0.add(steps * 256);
                        let out = c.as_mut_ptr().cast::<f32>().add(mb * BLOCK_M * cols + nb * BLOCK_N);
                        block(left.block(mb).add(t0 * 1024), p0, p1, 0..steps, out, cols * 4, false);
                    }
                }
            }
        });
    // SAFETY: the loop over (mb, nb) above stored every block of every part's padded output.
    let partial = unsafe { written(partial) };
    // The parts summed in order, the first one seeding each row.
    let mut out = unwritten(m * n);
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let mut parts = partial
            .chunks_exact(rows * cols)
            .map(|part| &part[i * cols..i * cols + n]);
        let first = parts.next().expect("k > 0 splits into at least one part");
        row.iter_mut().zip(first).for_each(|(o, &p)| {
            o.write(p);
        });
        // SAFETY: every value of the row was written just above.
        let row = unsafe { written_slice(row) };
        for part in parts {
            row.iter_mut().zip(part).for_each(|(o, p)| *o += p);
        }
    });
    // SAFETY: every row was written above.
    unsafe { written(out) }
}

/// [`product`] for a large `B`: one task per column block packs its two panels and walks all
/// row blocks of `A` under them, `k` in chunks of [`CHUNK_K_TILES`] (the panels' slice stays in
/// L1/L2; the output block is reloaded between chunks).
fn product_by_column_blocks(a: &[f32], m: usize, k: usize, n: usize, b: RightOperand<'_>) -> Vec<f32> {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    assert_eq!(a.len(), m * k, "a is [m, k]");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut out = unwritten(m * n);
    let left = LeftOperand::round(a, m, k);
    let k_tiles = left.k_tiles;
    let m_blocks = m.div_ceil(BLOCK_M);
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    (0..n.div_ceil(BLOCK_N))
        .into_par_iter()
        .for_each_init(Vec::new, |panel: &mut Vec<u32>, nb| {
            let n0 = nb * BLOCK_N;
            panel.resize(2 * k_tiles * 256, 0);
            let (p0, p1) = panel.split_at_mut(k_tiles * 256);
            b.pack_panel(n0, n, k, p0);
            b.pack_panel(n0 + 16, n, k, p1);
            let full_cols = n0 + BLOCK_N <= n;
            let mut scratch = [0f32; BLOCK_M * BLOCK_N];
            let out_ptr = &out_ptr;
            // SAFETY: AMX is available (asserted above).
            let _tiles = unsafe { TileSession::start() };
            for t0 in (0..k_tiles).step_by(CHUNK_K_TILES) {
                let ts = t0..(t0 + CHUNK_K_TILES).min(k_tiles);
                for mb in 0..m_blocks {
                    let m0 = mb * BLOCK_M;
                    let rows = BLOCK_M.min(m - m0);
                    let a_ptr = left.block(mb);
                    // SAFETY: `left` holds m_blocks row blocks of k_tiles tile steps, the
                    // panels k_tiles tiles each; the output block is either 32 × 32 inside `out`
                    // (this task's columns only) or the local scratch, copied back below.
                    unsafe {
                        if rows == BLOCK_M && full_cols {
                            let c = out_ptr.0.add(m0 * n + n0);
                            block(a_ptr, p0.as_ptr(), p1.as_ptr(), ts.clone(), c, n * 4, t0 > 0);
                        } else {
                            let cols = BLOCK_N.min(n - n0);
                            if t0 > 0 {
                                for r in 0..rows {
                                    let src = std::slice::from_raw_parts(out_ptr.0.add((m0 + r) * n + n0), cols);
                                    scratch[r * BLOCK_N..r * BLOCK_N + cols].copy_from_slice(src);
                                }
                            }
                            let c = scratch.as_mut_ptr();
                            block(a_ptr, p0.as_ptr(), p1.as_ptr(), ts.clone(), c, BLOCK_N * 4, t0 > 0);
                            for r in 0..rows {
                                let dst = std::slice::from_raw_parts_mut(out_ptr.0.add((m0 + r) * n + n0), cols);
                                dst.copy_from_slice(&scratch[r * BLOCK_N..r * BLOCK_N + cols]);
                            }
                        }
                    }
                }
            }
        });
    // SAFETY: every one of the m·n values was written above (blocks cover all rows and columns
    // in the first k pass).
    unsafe { written(out) }
}

/// [`product`] with `B`'s packed columns walked in groups of at most `group_bytes` (at least
/// one pair of panels per group).
///
/// With `prepack`, `B` is packed whole first, in parallel, and each task takes
/// [`TASK_ROW_BLOCKS`] row blocks of `A` and one column group; without, each task packs its
/// column group and takes all rows. For each of its row blocks a task walks the group's column
/// blocks left to right: its rows of `A` stay in L1/L2 while the group streams from L2, and the
/// output's rows are written one cache line after the next (walking the rows under one column
/// block instead touches a new page per row: the output stores cost a third of the product).
/// Each 32 × 32 output block is summed over all of `k` in tiles and stored once.
fn product_grouped(
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b: RightOperand<'_>,
    group_bytes: usize,
    prepack: bool,
) -> Vec<f32> {
    assert!(available(), "AMX bf16 tiles are not available on this CPU");
    assert_eq!(a.len(), m * k, "a is [m, k]");
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut out = unwritten(m * n);
    let left = LeftOperand::round(a, m, k);
    let k_tiles = left.k_tiles;
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK_M), n.div_ceil(BLOCK_N));
    // Two panels of 16 columns per column block, k_tiles tiles of 1 KiB each.
    let pair_len = 2 * k_tiles * 256;
    let pack_pair = |nb: usize, pair: &mut [u32]| {
        let (p0, p1) = pair.split_at_mut(k_tiles * 256);
        b.pack_panel(nb * BLOCK_N, n, k, p0);
        b.pack_panel(nb * BLOCK_N + 16, n, k, p1);
    };
    let mut packed = Vec::new();
    if prepack {
        packed = PACKED_PANELS.take();
        // Old words stay where the buffer was longer: every pair below overwrites them.
        packed.resize(n_blocks * pair_len, 0);
        packed
            .par_chunks_mut(pair_len)
            .enumerate()
            .for_each(|(nb, pair)| pack_pair(nb, pair));
    }
    let group = (group_bytes / (pair_len * 4)).max(1);
    let n_groups = n_blocks.div_ceil(group);
    // Packed whole, tasks split the rows too; packed per group, a task takes all rows.
    let task_blocks = if prepack { TASK_ROW_BLOCKS } else { m_blocks };
    let m_tasks = m_blocks.div_ceil(task_blocks);
    let out_ptr = SendPtr(out.as_mut_ptr().cast::<f32>());
    (0..m_tasks * n_groups)
        .into_par_iter()
        .for_each_init(Vec::new, |own: &mut Vec<u32>, task| {
            let (mt, ng) = (task % m_tasks, task / m_tasks);
            let nbs = ng * group..((ng + 1) * group).min(n_blocks);
            let panels: &[u32] = if prepack {
                &packed[nbs.start * pair_len..nbs.end * pair_len]
            } else {
                own.resize(nbs.len() * pair_len, 0);
                for (i, pair) in own.chunks_exact_mut(pair_len).enumerate() {
                    pack_pair(nbs.start + i, pair);
                }
                own
            };
            let out_ptr = &out_ptr;
            let mut scratch = [0f32; BLOCK_M * BLOCK_N];
            // SAFETY: AMX is available (asserted above).
            let _tiles = unsafe { TileSession::start() };
            for mb in mt * task_blocks..((mt + 1) * task_blocks).min(m_blocks) {
                let m0 = mb * BLOCK_M;
                let rows = BLOCK_M.min(m - m0);
                for nb in nbs.clone() {
                    let n0 = nb * BLOCK_N;
                    let cols = BLOCK_N.min(n - n0);
                    let p0 = panels[(nb - nbs.start) * pair_len..].as_ptr();
                    // SAFETY: `left` holds m_blocks row blocks of k_tiles tile steps, `panels`
                    // the group's pairs of panels of k_tiles tiles; the output block is either
                    // 32 × 32 inside `out` (this task's rows and columns only) or the local
                    // scratch, whose rows inside the output are copied there.
                    unsafe {
                        let p1 = p0.add(k_tiles * 256);
                        if rows == BLOCK_M && cols == BLOCK_N {
                            let c = out_ptr.0.add(m0 * n + n0);
                            block(left.block(mb), p0, p1, 0..k_tiles, c, n * 4, false);
                        } else {
                            block(
                                left.block(mb),
                                p0,
                                p1,
                                0..k_tiles,
                                scratch.as_mut_ptr(),
                                BLOCK_N * 4,
                                false,
                            );
                            for r in 0..rows {
                                let dst = std::slice::from_raw_parts_mut(out_ptr.0.add((m0 + r) * n + n0), cols);
                                dst.copy_from_slice(&scratch[r * BLOCK_N..r * BLOCK_N + cols]);
                            }
                        }
                    }
                }
            }
        });
    if prepack {
        PACKED_PANELS.set(packed);
    }
    // SAFETY: every one of the m·n values was written above (the tasks' blocks cover all rows
    // and columns).
    unsafe { written(out) }
}

/// Rows of `x` below which [`matmul_transposed`] reads the weight in place, row by row (one
/// token per call while decoding) instead of packing it into tiles, which would cost as much as
/// the product itself.
const SMALL_M: usize = 16;

crate::simd::multiversion! {
    /// `out[j·m + i] = Σ_l x[i·k + l]·w[j·k + l]` for the weight rows `w` `[rows, k]` (bf16 bits),
    /// `x` `[m, k]` already rounded to bf16 values: each weight row is read once for all `m`.
    fn dot_rows(x: &[f32], m: usize, k: usize, w: &[u16], out: &mut [f32]) {
        for (row, dst) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            for (i, d) in dst.iter_mut().enumerate() {
                let xi = &x[i * k..(i + 1) * k];
                let mut lanes = [0f32; 16];
                let mut wc = row.chunks_exact(16);
                let mut xc = xi.chunks_exact(16);
                for (wv, xv) in (&mut wc).zip(&mut xc) {
                    for l in 0..16 {
                        lanes[l] += xv[l] * bf16_value(wv[l]);
                    }
                }
                let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(&w, &x)| x * bf16_value(w)).sum();
                *d = lanes.iter().sum::<f32>() + tail;
            }
        }
    }
}

/// `x·Wᵀ` for a few rows of `x` (`m` < [`SMALL_M`]): the weight read in place, rows of it spread
/// over the threads; `x` rounded to bf16 as the tiles do.
fn small_matmul_transposed(x: &[f32], m: usize, w: &[u16], [n, k]: [usize; 2]) -> Vec<f32> {
    let rounded: Vec<f32> = x.iter().map(|&v| bf16_value(bf16_bits(v))).collect();
    // out transposed, [n, m]: each task writes whole rows of it.
    let mut transposed = vec![0f32; n * m];
    const ROWS_PER_TASK: usize = 64;
    transposed
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(w.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(dst, rows)| dot_rows(&rounded, m, k, rows, dst));
    let mut out = vec![0f32; m * n];
    for (j, col) in transposed.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// `x·Wᵀ` with `W` `[out, in]` stored as bf16 bits and `x` rounded to bf16; f32 sums.
///
/// # Shapes
/// - `x`: row-major `[m, in]`; `w`: row-major `[out, in]`; output: row-major `[m, out]`
///
/// # Panics
/// If AMX is not [`available`].
pub fn matmul_transposed(x: &[f32], m: usize, w: &[u16], shape: [usize; 2]) -> Vec<f32> {
    let [out, inp] = shape;
    assert_eq!(w.len(), out * inp, "w is [out, in]");
    if m < SMALL_M && inp > 0 {
        return small_matmul_transposed(x, m, w, shape);
    }
    product(x, m, inp, out, RightOperand::Transposed { w, cols: inp })
}

/// `g·W` with `W` `[out, in]` stored as bf16 bits and `g` rounded to bf16; f32 sums.
///
/// # Shapes
/// - `g`: row-major `[m, out]`; `w`: row-major `[out, in]`; output: row-major `[m, in]`
///
/// # Panics
/// If AMX is not [`available`].
pub fn matmul(g: &[f32], m: usize, w: &[u16], shape: [usize; 2]) -> Vec<f32> {
    let [out, inp] = shape;
    assert_eq!(w.len(), out * inp, "w is [out, in]");
    product(g, m, out, inp, RightOperand::Direct { w, cols: inp })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 values across the range: ties, NaN, infinities, signs, a subnormal.
    fn awkward(n: usize) -> Vec<f32> {
        let special = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::NAN,
            f32::INFINITY,
            -0.0,
            -2.5e30,
            1e-39,
        ];
        (0..n)
            .map(|i| match special.get(i % 97) {
                Some(&v) => v,
                None => ((i * 7919 % 1999) as f32 - 999.5) * 1.37e-3 * (1 + i % 5) as f32,
            })
            .collect()
    }

    /// What a subnormal becomes on either path (the CPU's conversion flushes it to zero).
    fn either(bits: u16, x: f32) -> bool {
        bits == bf16_bits(x) || (x.is_subnormal() && bits & 0x7FFF == 0)
    }

    #[test]
    fn row_blocks_and_pair_panels_hold_the_rounded_values() {
        // 29 rows (a partial block) or 32, 70 columns (a partial tile step), rows 75 apart,
        // factors; written over a dirty buffer (the buffers are reused between products).
        let (cols, stride): (usize, usize) = (70, 75);
        for (rows, f) in [29, 32].into_iter().flat_map(|rows| [(rows, false), (rows, true)]) {
            let x = awkward(rows * stride);
            let factors: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 7.0).collect();
            let f = f.then_some(&factors[..]);
            let mut out = vec![7u16; cols.div_ceil(TILE_K) * 1024];
            round_block(&x, rows, cols, stride, f, &mut out);
            for t in 0..cols.div_ceil(TILE_K) {
                for r in 0..BLOCK_M {
                    for c in 0..TILE_K {
                        let got = out[(t * 2 + r / 16) * 512 + (r % 16) * TILE_K + c];
                        let l = t * TILE_K + c;
                        if r < rows && l < cols {
                            let v = x[r * stride + l] * f.map_or(1.0, |f| f[r]);
                            assert!(either(got, v), "row {r} col {l}: {got:#06x} for {v:e}");
                        } else {
                            assert_eq!(got, 0, "padding at row {r} col {l}");
                        }
                    }
                }
            }
        }
        // B [k 45, n 37]: partial pairs and panels.
        let (k, n): (usize, usize) = (45, 37);
        let k_tiles = k.div_ceil(TILE_K);
        let x = awkward(k * stride);
        let mut words = vec![7u32; n.div_ceil(16) * k_tiles * 256];
        pack_pairs(&x, k, n, stride, k_tiles, &mut words);
        for (p, panel) in words.chunks_exact(k_tiles * 256).enumerate() {
            for pair in 0..k_tiles * 16 {
                for j in 0..16 {
                    let w = panel[(pair / 16) * 256 + (pair % 16) * 16 + j];
                    let col = p * 16 + j;
                    for (half, row) in [(w as u16, 2 * pair), ((w >> 16) as u16, 2 * pair + 1)] {
                        if row < k && col < n {
                            let v = x[row * stride + col];
                            assert!(either(half, v), "B[{row}, {col}]: {half:#06x} for {v:e}");
                        } else {
                            assert_eq!(half, 0, "padding at B[{row}, {col}]");
                        }
                    }
                }
            }
        }
    }

    /// A weight's panels ([`RightOperand::pack_panel`]) written over a dirty buffer (the buffers
    /// are reused between products): every word, padding included, for both readings of a stored
    /// W (forward: B = Wᵀ of W [37, 45]; input gradient: B = W of W [45, 37]), partial pairs and
    /// panels (k 45, n 37).
    #[test]
    fn weight_panels_are_written_whole() {
        if !available() {
            println!("no AMX: the panels are packed with AVX-512 for the tiles only");
            return;
        }
        let (k, n): (usize, usize) = (45, 37);
        let w: Vec<u16> = awkward(k * n).into_iter().map(bf16_bits).collect();
        for (b, at) in [
            (
                RightOperand::Transposed { w: &w, cols: k },
                (|r, c| c * 45 + r) as fn(usize, usize) -> usize,
            ),
            (RightOperand::Direct { w: &w, cols: n }, |r, c| r * 37 + c),
        ] {
            let k_tiles = k.div_ceil(TILE_K);
            for n0 in (0..n).step_by(16) {
                let mut panel = vec![7u32; k_tiles * 256];
                b.pack_panel(n0, n, k, &mut panel);
                for (pair, j) in (0..k_tiles * 16).flat_map(|p| (0..16).map(move |j| (p, j))) {
                    let word = panel[(pair / 16) * 256 + (pair % 16) * 16 + j];
                    for (half, row) in [(word as u16, 2 * pair), ((word >> 16) as u16, 2 * pair + 1)] {
                        let col = n0 + j;
                        let want = if row < k && col < n { w[at(row, col)] } else { 0 };
                        assert_eq!(half, want, "panel at {n0}: B[{row}, {col}]");
                    }
                }
            }
        }
    }

    /// The product's orders change which task computes a block and when, not its value: every
    /// block is summed over `k` in order either way (column groups of one pair of panels up to
    /// one group; column blocks with `k` in chunks, the block reloaded between them), for both
    /// operand layouts, partial row blocks and columns.
    #[test]
    fn products_in_either_order_are_the_same_bits() {
        if !available() {
            println!("no AMX: nothing to compare");
            return;
        }
        let finite = |len: usize| -> Vec<f32> {
            awkward(len)
                .into_iter()
                .map(|v| if v.is_finite() { v } else { 0.5 })
                .collect()
        };
        for (m, k, n) in [
            (150usize, 70usize, 200usize),
            (40, 1100, 50),
            (37, 4500, 40),
            (37, 40, 4500),
        ] {
            // W [n, k]: B = Wᵀ (k × n, the forward product) or B = W (n × k, the input gradient).
            let w: Vec<u16> = finite(n * k).into_iter().map(bf16_bits).collect();
            let pair_bytes = 2 * k.max(n).div_ceil(TILE_K) * 1024;
            for (b, inner, outer) in [
                (RightOperand::Transposed { w: &w, cols: k }, k, n),
                (RightOperand::Direct { w: &w, cols: k }, n, k),
            ] {
                let a = finite(m * inner);
                let whole = product_grouped(&a, m, inner, outer, b, usize::MAX, true);
                let same = |other: &[f32]| whole.iter().zip(other).all(|(p, q)| p.to_bits() == q.to_bits());
                for group_bytes in [0, pair_bytes, 3 * pair_bytes] {
                    for prepack in [true, false] {
                        let grouped = product_grouped(&a, m, inner, outer, b, group_bytes, prepack);
                        assert!(
                            same(&grouped),
                            "[{m}, {inner}, {outer}] in groups of {group_bytes} bytes, packed whole: {prepack}"
                        );
                    }
                }
                let by_columns = product_by_column_blocks(&a, m, inner, outer, b);
                assert!(same(&by_columns), "[{m}, {inner}, {outer}] by column blocks");
                // Split over k the sums run in another order: equal up to f32 rounding of
                // sums of `inner` products.
                let split = product_split_k(&a, m, inner, outer, b);
                let scale = whole.iter().fold(1f32, |s, v| s.max(v.abs()));
                let worst = whole
                    .iter()
                    .zip(&split)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst <= 1e-6 * inner as f32 * scale,
                    "[{m}, {inner}, {outer}] split over k: {worst} off (values up to {scale})"
                );
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to the even 1.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
    }
}
