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
            return ndarray::Zip::from(&array)
                .par_map_collect(|&x| f(x))
                .into_shared();
        }
        self.mapv_into(f)
    }
}

/// `f(lhs, rhs)` elementwise with broadcasting, on the rayon pool when the result has at least
/// [`PAR_MIN`] elements; `None` (the caller's serial path) otherwise or when the shapes do not
/// broadcast.
pub(crate) fn par_zip<E: NdArrayElement, F: Fn(E, E) -> E + Sync + Send>(
    lhs: &SharedArray<E>,
    rhs: &SharedArray<E>,
    f: F,
) -> Option<SharedArray<E>> {
    #[cfg(feature = "multi-threads")]
    {
        let (l, r) = (lhs.shape(), rhs.shape());
        if l.len() != r.len() {
            return None;
        }
        let mut shape = alloc::vec::Vec::with_capacity(l.len());
        for (&a, &b) in l.iter().zip(r) {
            shape.push(match (a, b) {
                _ if a == b => a,
                (1, _) => b,
                (_, 1) => a,
                _ => return None,
            });
        }
        if shape.iter().product::<usize>() < PAR_MIN {
            return None;
        }
        let shape = ndarray::IxDyn(&shape);
        let (l, r) = (lhs.broadcast(shape.clone())?, rhs.broadcast(shape)?);
        Some(
            ndarray::Zip::from(&l)
                .and(&r)
                .par_map_collect(|&a, &b| f(a, b))
                .into_shared(),
        )
    }
    #[cfg(not(feature = "multi-threads"))]
    {
        let _ = (lhs, rhs, f);
        None
    }
}
