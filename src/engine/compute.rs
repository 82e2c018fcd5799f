//! Which compute backend llama.cpp runs on (CPU, CUDA, Metal, ROCm, Vulkan) and its devices,
//! so operators see at start, in readiness and in `/api/ps` whether a GPU build really uses
//! its GPU.

use serde::{Deserialize, Serialize};

use super::loader;
use super::LoadError;

/// One device llama.cpp can compute on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    /// llama.cpp's name, e.g. `CUDA0`, `CPU`.
    pub name: String,
    /// What it is, e.g. `NVIDIA H100 80GB HBM3`.
    pub description: String,
    /// Its backend, e.g. `CUDA`.
    pub backend: String,
    /// `cpu`, `gpu`, `igpu`, `accelerator`.
    pub kind: String,
    /// Memory in bytes.
    pub memory_total: u64,
    /// Free memory in bytes, when it was asked.
    pub memory_free: u64,
}

/// The compute side of this process.
#[derive(Debug, Clone, Serialize)]
pub struct Compute {
    /// The backend models run on: the first GPU device's, else `CPU`.
    pub backend: String,
    /// Every device.
    pub devices: Vec<Device>,
    /// Built with a GPU feature (`cuda`, `metal`, `rocm`, `vulkan`).
    pub gpu_build: bool,
}

impl Compute {
    /// Whether a GPU (or other accelerator) is available.
    pub fn has_gpu(&self) -> bool {
        self.devices.iter().any(|d| d.kind != "cpu")
    }

    /// A GPU build that found no GPU: it runs, slowly, on the CPU.
    pub fn gpu_missing(&self) -> bool {
        self.gpu_build && !self.has_gpu()
    }
}

/// Asks llama.cpp (initialising it if needed).
pub fn compute() -> Result<Compute, LoadError> {
    loader::backend()?;
    let devices: Vec<Device> = llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| {
            use llama_cpp_2::LlamaBackendDeviceType as T;
            Device {
                kind: match d.device_type {
                    T::Cpu => "cpu",
                    T::Gpu => "gpu",
                    T::IntegratedGpu => "igpu",
                    T::Accelerator => "accelerator",
                    T::Unknown => "unknown",
                }
                .to_owned(),
                name: d.name,
                description: d.description,
                backend: d.backend,
                memory_total: d.memory_total as u64,
                memory_free: d.memory_free as u64,
            }
        })
        .collect();
    let backend = devices
        .iter()
        .find(|d| d.kind != "cpu")
        .map_or_else(|| "CPU".to_owned(), |d| d.backend.clone());
    Ok(Compute {
        backend,
        devices,
        gpu_build: cfg!(any(
            feature = "cuda",
            feature = "metal",
            feature = "rocm",
            feature = "vulkan"
        )),
    })
}
