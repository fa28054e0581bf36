//! Ember patch: elementwise maps on the rayon pool for large arrays.
//!
//! Upstream burn-ndarray 0.21 maps unary and binary float ops on one thread (`mapv_into`,
//! `&lhs + &rhs`) unless its `simd` feature is on, and then still on one thread; on a
//! two-core machine that leaves half of the CPU idle for the elementwise half of a training
//! step. Arrays with at least [`PAR_MIN`] elements are split across the pool here; the
//! per-element function is the same, so results are bit-identical to the serial path.

use crate::{NdArrayElement, SharedArray};

/// Arrays shorter than this stay on the calling thread (splitting would cost more than it saves).
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Elements per rayon task for contiguous in-place maps.
#[cfg(feature = "multi-threads")]
const PAR_CHUNK: usize = 1 << 13;

/// `mapv_into` that splits large arrays across the rayon pool (in place when the array is
/// contiguous and not shared, as `mapv_into` would be).
pub(crate) trait ParMapvInto<E> {
    /// Applies `f` to every element.
    fn par_mapv_into<F: Fn(E) -> E + Sync + Send>(self, f: F) -> SharedArray<E>;
}

impl<E: NdArrayElement> ParMapvInto<E> for SharedArray<E> {
    fn par_mapv_into<F: Fn(E) -> E + Sync + Send>(self, f: F) -> SharedArray<E> {
        #[cfg(feature = "multi-threads")]
        if self.len() >= PAR_MIN {
            use rayon::prelude::*;
            let mut array = self;
            if array.is_standard_layout() && array.is_unique() {
                let slice = array.as_slice_mut().expect("standard layout is contiguous");
                slice
                    .par_chunks_mut(PAR_CHUNK)
                    .for_each(|chunk| chunk.iter_mut().for_each(|x| *x = f(*x)));
                return array;
            }
            return ndarray::Zip::from(&array).par_map_collect(|&x| f(x)).into_shared();
        }
        self.mapv_into(f)
    }
}

/// `f(lhs, rhs)` elementwise with broadcasting, on the rayon pool when the result has at least
/// [`PAR_MIN`] elements: in place in `lhs` when it is contiguous, not shared and already of
/// the result's shape (as ndarray's by-value operators reuse it), else into a new array.
/// Hands the operands back (the caller's serial path) for small results or shapes that do not
/// broadcast.
#[allow(clippy::type_complexity)]
pub(crate) fn par_zip<E: NdArrayElement, F: Fn(E, E) -> E + Sync + Send>(
    lhs: SharedArray<E>,
    rhs: SharedArray<E>,
    f: F,
) -> Result<SharedArray<E>, (SharedArray<E>, SharedArray<E>)> {
    #[cfg(feature = "multi-threads")]
    {
        let (l, r) = (lhs.shape(), rhs.shape());
        if l.len() != r.len() {
            return Err((lhs, rhs));
        }
        let mut shape = alloc::vec::Vec::with_capacity(l.len());
        for (&a, &b) in l.iter().zip(r) {
            shape.push(match (a, b) {
                _ if a == b => a,
                (1, _) => b,
                (_, 1) => a,
                _ => return Err((lhs, rhs)),
            });
        }
        if shape.iter().product::<usize>() < PAR_MIN {
            return Err((lhs, rhs));
        }
        let mut lhs = lhs;
        let in_place = lhs.shape() == shape.as_slice() && lhs.is_standard_layout() && lhs.is_unique();
        let shape = ndarray::IxDyn(&shape);
        if in_place {
            let r = rhs.broadcast(shape).expect("shapes broadcast (checked above)");
            ndarray::Zip::from(&mut lhs).and(&r).par_for_each(|a, &b| *a = f(*a, b));
            return Ok(lhs);
        }
        let l = lhs.broadcast(shape.clone()).expect("shapes broadcast (checked above)");
        let r = rhs.broadcast(shape).expect("shapes broadcast (checked above)");
        Ok(ndarray::Zip::from(&l)
            .and(&r)
            .par_map_collect(|&a, &b| f(a, b))
            .into_shared())
    }
    #[cfg(not(feature = "multi-threads"))]
    {
        let _ = &f;
        Err((lhs, rhs))
    }
}

/// `f` over every lane along `axis` (one output element per lane), on the rayon pool when the
/// array has at least [`PAR_MIN`] elements; the output keeps `axis` with length 1. Each lane is
/// reduced exactly as the serial code reduces it, so the results are the same.
pub(crate) fn par_reduce_lanes<E: NdArrayElement, F: Fn(ndarray::ArrayView1<'_, E>) -> E + Sync + Send>(
    array: &SharedArray<E>,
    axis: usize,
    f: F,
) -> SharedArray<E> {
    let mut keep = array.shape().to_vec();
    keep[axis] = 1;
    let lanes = ndarray::Zip::from(array.lanes(ndarray::Axis(axis)));
    #[cfg(feature = "multi-threads")]
    let reduced = if array.len() >= PAR_MIN {
        lanes.par_map_collect(|lane| f(lane))
    } else {
        lanes.map_collect(|lane| f(lane))
    };
    #[cfg(not(feature = "multi-threads"))]
    let reduced = lanes.map_collect(|lane| f(lane));
    reduced
        .into_shape_with_order(ndarray::IxDyn(&keep))
        .expect("one value per lane")
        .into_shared()
}
