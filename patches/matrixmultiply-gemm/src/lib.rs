//! `matrixmultiply`'s general matrix multiplication API, computed by the [`gemm`] crate.
//!
//! burn-ndarray multiplies matrices through ndarray, and ndarray through `matrixmultiply`, whose
//! f32 kernel stops at AVX2. The `gemm` crate picks AVX-512 kernels at run time where the CPU has
//! them, has a matrix-vector path (decoding multiplies one row at a time), and threads through
//! rayon, the pool burn-ndarray already uses. The workspace swaps this crate in with
//! `[patch.crates-io]`; every signature and its meaning are matrixmultiply 0.3's:
//! `C ← α A B + β C`, with row and column strides in elements, and `C` not read when `β = 0`.

use gemm::{c32 as Complex32, c64 as Complex64, Parallelism};

/// Whether to conjugate a complex operand (matrixmultiply's `CGemmOption`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CGemmOption {
    /// Use the matrix as it is.
    Standard,
    /// Use the complex conjugate of the matrix.
    Conjugate,
}

/// Calls `gemm` with matrixmultiply's argument order; `gemm` computes `dst ← a·dst + b·lhs·rhs`.
///
/// # Safety
/// As matrixmultiply's: the pointers and strides must describe valid `m×k`, `k×n` and `m×n`
/// matrices, and `c` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_call<T: 'static + Copy + PartialEq>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: *const T,
    (rsa, csa): (isize, isize),
    b: *const T,
    (rsb, csb): (isize, isize),
    beta: T,
    zero: T,
    c: *mut T,
    (rsc, csc): (isize, isize),
    (conj_a, conj_b): (bool, bool),
) {
    if m == 0 || n == 0 {
        return;
    }
    // matrixmultiply never reads C when β = 0 (it may hold garbage); gemm's `read_dst` says the same.
    let read_dst = beta != zero;
    gemm::gemm(
        m,
        n,
        k,
        c,
        csc,
        rsc,
        read_dst,
        a,
        csa,
        rsa,
        b,
        csb,
        rsb,
        beta,
        alpha,
        false,
        conj_a,
        conj_b,
        Parallelism::Rayon(0),
    );
}

/// `C ← α A B + β C` for f32 (see the crate documentation for the layout).
///
/// # Safety
/// `a`, `b` and `c` must point to `m×k`, `k×n` and `m×n` matrices with the given strides, and
/// `c` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    gemm_call(
        m,
        k,
        n,
        alpha,
        a,
        (rsa, csa),
        b,
        (rsb, csb),
        beta,
        0.0,
        c,
        (rsc, csc),
        (false, false),
    )
}

/// `C ← α A B + β C` for f64.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn dgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: *const f64,
    rsa: isize,
    csa: isize,
    b: *const f64,
    rsb: isize,
    csb: isize,
    beta: f64,
    c: *mut f64,
    rsc: isize,
    csc: isize,
) {
    gemm_call(
        m,
        k,
        n,
        alpha,
        a,
        (rsa, csa),
        b,
        (rsb, csb),
        beta,
        0.0,
        c,
        (rsc, csc),
        (false, false),
    )
}

/// A complex f32 number as matrixmultiply stores it: `[re, im]`.
#[allow(non_camel_case_types)]
pub type c32 = [f32; 2];
/// A complex f64 number as matrixmultiply stores it: `[re, im]`.
#[allow(non_camel_case_types)]
pub type c64 = [f64; 2];

/// `C ← α op(A) op(B) + β C` for complex f32, `op` the conjugate where asked.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn cgemm(
    flaga: CGemmOption,
    flagb: CGemmOption,
    m: usize,
    k: usize,
    n: usize,
    alpha: c32,
    a: *const c32,
    rsa: isize,
    csa: isize,
    b: *const c32,
    rsb: isize,
    csb: isize,
    beta: c32,
    c: *mut c32,
    rsc: isize,
    csc: isize,
) {
    let z = |v: c32| Complex32::new(v[0], v[1]);
    gemm_call(
        m,
        k,
        n,
        z(alpha),
        a.cast::<Complex32>(),
        (rsa, csa),
        b.cast::<Complex32>(),
        (rsb, csb),
        z(beta),
        Complex32::new(0.0, 0.0),
        c.cast::<Complex32>(),
        (rsc, csc),
        (flaga == CGemmOption::Conjugate, flagb == CGemmOption::Conjugate),
    )
}

/// `C ← α op(A) op(B) + β C` for complex f64, `op` the conjugate where asked.
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn zgemm(
    flaga: CGemmOption,
    flagb: CGemmOption,
    m: usize,
    k: usize,
    n: usize,
    alpha: c64,
    a: *const c64,
    rsa: isize,
    csa: isize,
    b: *const c64,
    rsb: isize,
    csb: isize,
    beta: c64,
    c: *mut c64,
    rsc: isize,
    csc: isize,
) {
    let z = |v: c64| Complex64::new(v[0], v[1]);
    gemm_call(
        m,
        k,
        n,
        z(alpha),
        a.cast::<Complex64>(),
        (rsa, csa),
        b.cast::<Complex64>(),
        (rsb, csb),
        z(beta),
        Complex64::new(0.0, 0.0),
        c.cast::<Complex64>(),
        (rsc, csc),
        (flaga == CGemmOption::Conjugate, flagb == CGemmOption::Conjugate),
    )
}
