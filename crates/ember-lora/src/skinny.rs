//! `Sᵀ·W` for a skinny `S`: the LoRA gradients' products over the tokens.
//!
//! `∂A = (s·g·B)ᵀ·x` (`[r, in]`) and `∂Bᵀ = (x·Aᵀ)ᵀ·g` (`[r, out]`) contract thousands of
//! tokens into `r` (the adapter's rank, 8–64) rows. A general matmul packs the whole wide
//! operand for those few rows of output, and the packing costs more than the product; here each
//! AVX-512 task keeps a 16 × 16 block of the output in registers and streams its 16 columns of
//! `W` once, with no packing (1.4–1.7× `gemm` on SmolLM2's shapes).

use rayon::prelude::*;

/// Rows of the output per register block.
const BLOCK_ROWS: usize = 16;
/// Columns of the output per register block (one AVX-512 vector).
const BLOCK_COLS: usize = 16;
/// Tokens summed in registers before they are added to the block's totals: a sum over a few
/// thousand tokens in one running f32 accumulator drifts further from the exact one than a
/// general matmul's (which adds `k` in blocks) does.
const CHUNK_TOKENS: usize = 128;

/// Whether [`skinny_tn`] is the faster way to compute `[r, n]` outputs over `k` tokens (the rank
/// small, the wide operand large enough to pay for the threads), with AVX-512.
pub(crate) fn suits(k: usize, r: usize, n: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        r <= 2 * BLOCK_ROWS && k * n >= 1 << 16 && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (k, r, n);
        false
    }
}

/// `C = Sᵀ·W` into a new row-major `[r, n]` buffer, for `S` `[k, r]` (rows `s_stride` apart)
/// and `W` `[k, n]` (rows `w_stride` apart, columns contiguous). Each output is one sum over
/// `l` in order (fused multiply-adds).
///
/// Without AVX-512F the blocks run a portable loop (correct, slow: [`suits`] says no there).
///
/// # Panics
/// If the operands are shorter than their shapes.
pub(crate) fn skinny_tn(s: &[f32], s_stride: usize, w: &[f32], w_stride: usize, [k, r, n]: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0f32; r * n];
    if k == 0 || r == 0 || n == 0 {
        return out;
    }
    assert!(
        (k - 1) * s_stride + r <= s.len() && (k - 1) * w_stride + n <= w.len(),
        "skinny_tn: operands shorter than [{k}, {r}] and [{k}, {n}]"
    );
    let (row_blocks, col_blocks) = (r.div_ceil(BLOCK_ROWS), n.div_ceil(BLOCK_COLS));
    // A zero-padded copy of S when its rows are not whole blocks (a few KiB: k × 16 or 32).
    let padded;
    let (s, s_stride) = if r % BLOCK_ROWS == 0 {
        (s, s_stride)
    } else {
        let width = row_blocks * BLOCK_ROWS;
        let mut p = vec![0f32; k * width];
        for l in 0..k {
            p[l * width..l * width + r].copy_from_slice(&s[l * s_stride..l * s_stride + r]);
        }
        padded = p;
        (&padded[..], width)
    };
    // One task per 16 columns of W; its blocks are written into a column-major scratch.
    let blocks: Vec<[[f32; BLOCK_COLS]; BLOCK_ROWS]> = (0..col_blocks * row_blocks)
        .into_par_iter()
        .map(|b| {
            let (cb, rb) = (b / row_blocks, b % row_blocks);
            let (j0, i0) = (cb * BLOCK_COLS, rb * BLOCK_ROWS);
            let cols = BLOCK_COLS.min(n - j0);
            let mut acc = [[0f32; BLOCK_COLS]; BLOCK_ROWS];
            if cols == BLOCK_COLS {
                block(&s[i0..], s_stride, &w[j0..], w_stride, k, &mut acc);
            } else {
                let mut tail = vec![0f32; k * BLOCK_COLS];
                for l in 0..k {
                    tail[l * BLOCK_COLS..l * BLOCK_COLS + cols]
                        .copy_from_slice(&w[l * w_stride + j0..l * w_stride + j0 + cols]);
                }
                block(&s[i0..], s_stride, &tail, BLOCK_COLS, k, &mut acc);
            }
            acc
        })
        .collect();
    for (b, acc) in blocks.iter().enumerate() {
        let (cb, rb) = (b / row_blocks, b % row_blocks);
        let (j0, i0) = (cb * BLOCK_COLS, rb * BLOCK_ROWS);
        let cols = BLOCK_COLS.min(n - j0);
        for (a, sums) in acc.iter().enumerate().take(BLOCK_ROWS.min(r.saturating_sub(i0))) {
            out[(i0 + a) * n + j0..(i0 + a) * n + j0 + cols].copy_from_slice(&sums[..cols]);
        }
    }
    out
}

/// One 16 × 16 block: `acc[a][c] = Σ_l s[l·s_stride + a]·w[l·w_stride + c]` for `l < k`
/// (`s` from the block's first row, `w` from its first column), in fused multiply-adds.
fn block(s: &[f32], s_stride: usize, w: &[f32], w_stride: usize, k: usize, acc: &mut [[f32; BLOCK_COLS]; BLOCK_ROWS]) {
    assert!(
        k == 0 || ((k - 1) * s_stride + BLOCK_ROWS <= s.len() && (k - 1) * w_stride + BLOCK_COLS <= w.len()),
        "skinny block out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked); the bounds are asserted above.
        unsafe { block_avx512(s.as_ptr(), s_stride, w.as_ptr(), w_stride, k, acc) };
        return;
    }
    // Without AVX-512 (never chosen by `suits`; the tests run it there): the same sums.
    *acc = [[0f32; BLOCK_COLS]; BLOCK_ROWS];
    for l0 in (0..k).step_by(CHUNK_TOKENS) {
        let mut chunk = [[0f32; BLOCK_COLS]; BLOCK_ROWS];
        for l in l0..k.min(l0 + CHUNK_TOKENS) {
            let x = &w[l * w_stride..l * w_stride + BLOCK_COLS];
            for (a, sums) in chunk.iter_mut().enumerate() {
                let v = s[l * s_stride + a];
                sums.iter_mut().zip(x).for_each(|(c, x)| *c = v.mul_add(*x, *c));
            }
        }
        for (total, part) in acc.iter_mut().zip(&chunk) {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
        }
    }
}

/// [`block`] in 16 AVX-512 registers.
///
/// # Safety
/// The CPU has AVX-512F; 16 values readable at `s + l·s_stride` and `w + l·w_stride` for `l < k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(
    s: *const f32,
    s_stride: usize,
    w: *const f32,
    w_stride: usize,
    k: usize,
    acc: &mut [[f32; BLOCK_COLS]; BLOCK_ROWS],
) {
    use std::arch::x86_64::*;
    // SAFETY: within the bounds the caller guarantees.
    unsafe {
        let mut total = [_mm512_setzero_ps(); BLOCK_ROWS];
        for l0 in (0..k).step_by(CHUNK_TOKENS) {
            let mut c = [_mm512_setzero_ps(); BLOCK_ROWS];
            for l in l0..k.min(l0 + CHUNK_TOKENS) {
                let x = _mm512_loadu_ps(w.add(l * w_stride));
                let row = s.add(l * s_stride);
                for (a, sum) in c.iter_mut().enumerate() {
                    *sum = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(a)), x, *sum);
                }
            }
            for (t, part) in total.iter_mut().zip(c) {
                *t = _mm512_add_ps(*t, part);
            }
        }
        for (sums, v) in acc.iter_mut().zip(total) {
            _mm512_storeu_ps(sums.as_mut_ptr(), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::random;

    #[test]
    fn skinny_products_equal_f64_sums() {
        // Ragged ranks (padded row blocks), column tails, strides wider than the rows.
        for (k, r, n, s_extra, w_extra) in [
            (37, 5, 50, 0, 3),
            (1000, 16, 97, 2, 0),
            (300, 20, 600, 0, 7),
            (2048, 32, 64, 0, 0),
        ] {
            let (s_stride, w_stride) = (r + s_extra, n + w_extra);
            let s = random(k * s_stride, 31, 1.0);
            let w = random(k * w_stride, 32, 1.0);
            let c = skinny_tn(&s, s_stride, &w, w_stride, [k, r, n]);
            for i in 0..r {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|l| s[l * s_stride + i] as f64 * w[l * w_stride + j] as f64)
                        .sum();
                    let got = c[i * n + j];
                    assert!(
                        (got as f64 - exact).abs() <= 1e-6 * k as f64,
                        "C[{i}, {j}] = {got}, exact {exact} ([{k}, {r}, {n}])"
                    );
                }
            }
        }
    }
}
