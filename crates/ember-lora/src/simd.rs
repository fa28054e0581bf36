//! Ember's own hot loops compiled for the CPU they run on.
//!
//! The crates are built for baseline x86-64 (SSE2, 4 lanes), so loops over score rows and
//! logits vectorise 4 wide unless told otherwise; `gemm` picks AVX-512 at run time, Ember's
//! element-wise kernels did not. [`multiversion!`] compiles a function body three times
//! (AVX-512F, AVX2 + FMA, baseline) and picks one per call by runtime detection (cached by
//! std). Rust never contracts `a·b + c` into an FMA on its own and the bodies fix their
//! reduction order (explicit lanes), so every version returns bit-identical results.

/// Defines a function whose body is compiled for AVX-512F, for AVX2 + FMA and for the
/// baseline, dispatching at run time. The body must be safe code; arguments are plain values
/// or references (no generics).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked above); the body is safe code.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked above); the body is safe code.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The largest value of `row` (−∞ for an empty row), in 16 lanes so that it vectorises.
#[inline(always)]
pub(crate) fn lane_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(l, &x)| *l = if x > *l { x } else { *l });
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    lanes.iter().fold(tail, |a, &x| a.max(x))
}
