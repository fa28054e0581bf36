//! The one place where a command picks its burn backend.
//!
//! Every command body that touches tensors is a [`BackendJob`]: generic over the backend, run
//! by [`on_device`] on the backend that `--device` (or a run config's `device:`) and the base
//! dtype name. Training wraps the chosen backend in burn's `Autodiff` itself.

use anyhow::{bail, Result};
use burn::tensor::DType;
use ember_lora::EmberBackend;
use ember_model::BaseDtype;
use ember_train::config::DeviceKind;

/// A command body that runs on any burn backend.
pub trait BackendJob {
    /// What the command returns.
    type Output;

    /// Runs the command on backend `B`, on `device`.
    fn run<B: EmberBackend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Runs `job` on the backend for `kind` with a frozen base in `dtype`: burn-ndarray for an
/// f32 or bf16 base on the CPU (bf16 weights as host blocks, multiplied on AMX tiles where the
/// CPU has them), burn-flex for an f16 one (or for `flex`), burn-cuda, burn-wgpu.
/// A backend missing from this build, or one that cannot hold `dtype`, is an error that says
/// what to do.
pub fn on_device<J: BackendJob>(kind: DeviceKind, dtype: BaseDtype, job: J) -> Result<J::Output> {
    match kind {
        DeviceKind::Cpu if dtype != BaseDtype::Float16 => checked::<burn::backend::NdArray<f32>, J>(kind, dtype, job),
        DeviceKind::Cpu | DeviceKind::Flex => checked::<burn::backend::Flex, J>(kind, dtype, job),
        DeviceKind::Cuda => cuda(dtype, job),
        DeviceKind::Wgpu => wgpu(dtype, job),
    }
}

/// `job` on `B`'s default device, after checking that `B` can store `dtype` there.
fn checked<B: EmberBackend, J: BackendJob>(kind: DeviceKind, dtype: BaseDtype, job: J) -> Result<J::Output> {
    let device = B::Device::default();
    let host_bf16 = dtype == BaseDtype::Bfloat16 && B::bf16_base_on_host(&device);
    if !host_bf16 && !B::supports_dtype(&device, DType::from(dtype.float_dtype())) {
        bail!(
            "--device {kind} ({}) cannot store {dtype} tensors on this machine; use another dtype or device",
            B::name(&device)
        );
    }
    job.run::<B>(device)
}

#[cfg(feature = "cuda")]
fn cuda<J: BackendJob>(dtype: BaseDtype, job: J) -> Result<J::Output> {
    // burn-cuda compiles its kernels at run time with NVRTC against the toolkit's headers and
    // panics when it finds none; the same search, as an error that says what to install.
    let toolkit = std::env::var_os("CUDA_PATH").map(std::path::PathBuf::from).or_else(|| {
        ["/usr/local/cuda", "/opt/cuda", "/usr"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("include/cuda.h").exists())
    });
    match toolkit {
        Some(path) if path.join("include").exists() => {}
        _ => bail!(
            "--device cuda: no CUDA toolkit found (burn-cuda compiles kernels at run time with NVRTC and \
             the toolkit's headers); install it (NVRTC + headers) and set CUDA_PATH, or use /usr/local/cuda"
        ),
    }
    checked::<burn::backend::Cuda<f32>, J>(DeviceKind::Cuda, dtype, job)
}

#[cfg(not(feature = "cuda"))]
fn cuda<J: BackendJob>(_: BaseDtype, _: J) -> Result<J::Output> {
    bail!(
        "this ember was built without CUDA; rebuild with `cargo build --release --features cuda` \
         (needs the NVIDIA driver and the CUDA toolkit's NVRTC at run time)"
    )
}

#[cfg(feature = "wgpu")]
fn wgpu<J: BackendJob>(dtype: BaseDtype, job: J) -> Result<J::Output> {
    checked::<burn::backend::Wgpu, J>(DeviceKind::Wgpu, dtype, job)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu<J: BackendJob>(_: BaseDtype, _: J) -> Result<J::Output> {
    bail!("this ember was built without wgpu; rebuild with `cargo build --release --features wgpu`")
}
