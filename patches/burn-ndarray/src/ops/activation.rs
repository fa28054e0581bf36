use crate::ops::par_elementwise::ParMapvInto;
use crate::{
    ExpElement, NdArray, NdArrayTensor, SharedArray, execute_with_float_dtype,
    element::{FloatNdArrayElement, IntNdArrayElement, QuantElement},
    execute_with_numeric_dtype,
    ops::NdArrayMathOps,
};
use burn_backend::{ElementConversion, TensorMetadata, ops::ActivationOps, tensor::FloatTensor};

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> ActivationOps<Self>
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn relu(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        execute_with_numeric_dtype!(tensor, |array| NdArrayMathOps::clamp_min(array, 0.elem()))
    }

    /// Ember patch: `1 / (1 + e^−x)` in one pass (on the rayon pool for large arrays). The
    /// default, `exp(−log(1 + exp(−x)))` cast to f32 and back, walks the tensor seven times
    /// with two `exp` and one `log` per element; for f32/f64 this form is as accurate (it
    /// saturates to exactly 0 or 1 where the exponential overflows or vanishes).
    fn sigmoid(tensor: FloatTensor<Self>) -> FloatTensor<Self> {
        execute_with_float_dtype!(tensor, FloatElem, |array: SharedArray<FloatElem>| {
            array.par_mapv_into(|x: FloatElem| {
                let one: FloatElem = 1.elem();
                one / (one + (-x).exp_elem())
            })
        })
    }
}
