//! Choosing where to compute: a hardware GPU through wgpu (Vulkan/Metal/DX12), CUDA when built
//! with the `cuda` feature, or the CPU (burn's `flex` backend).

use anyhow::Result;
use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// A hardware GPU adapter if there is one, else the CPU. Never a software rasterizer
    /// (llvmpipe/lavapipe), which is several times slower than the CPU backend.
    Auto,
    /// burn's `flex` CPU backend.
    Cpu,
    /// Any wgpu adapter, software ones included (how the tests reach lavapipe).
    Wgpu,
    /// CUDA device 0; needs a build with `--features cuda`.
    Cuda,
}

/// The device a run computes on, and how to describe it to the user.
#[derive(Clone, Debug)]
pub struct ComputeDevice {
    pub device: Device,
    /// `flex`, `wgpu` or `cuda`.
    pub backend: &'static str,
    /// The adapter or processor name.
    pub adapter: String,
}

impl ComputeDevice {
    pub fn cpu() -> Self {
        Self {
            device: Device::flex(),
            backend: "flex",
            adapter: format!("CPU, {} threads", rayon_threads()),
        }
    }

    pub fn is_wgpu(&self) -> bool {
        self.backend == "wgpu"
    }

    pub fn describe(&self) -> String {
        format!("{} ({})", self.backend, self.adapter)
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Hardware (non-CPU) wgpu adapters visible on this machine, best first.
pub fn hardware_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let mut adapters: Vec<wgpu::AdapterInfo> =
        pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
            .iter()
            .map(|a| a.get_info())
            .filter(|info| {
                matches!(
                    info.device_type,
                    wgpu::DeviceType::DiscreteGpu
                        | wgpu::DeviceType::IntegratedGpu
                        | wgpu::DeviceType::VirtualGpu
                )
            })
            .collect();
    adapters.sort_by_key(|info| match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        _ => 2,
    });
    adapters
}

pub fn select(choice: DeviceChoice) -> Result<ComputeDevice> {
    match choice {
        DeviceChoice::Cpu => Ok(ComputeDevice::cpu()),
        DeviceChoice::Wgpu => {
            let device = Device::wgpu(DeviceKind::DefaultDevice);
            let adapter = device
                .identity()
                .map(|id| id.name)
                .unwrap_or_else(|| "unknown adapter".into());
            Ok(ComputeDevice {
                device,
                backend: "wgpu",
                adapter,
            })
        }
        DeviceChoice::Auto => {
            let Some(best) = hardware_adapters().into_iter().next() else {
                return Ok(ComputeDevice::cpu());
            };
            let kind = match best.device_type {
                wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(0),
                wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
                _ => DeviceKind::VirtualGpu(0),
            };
            let device = Device::wgpu(kind);
            // burn enumerates on its own backend; trust it only if it found a real card too.
            match device.identity() {
                Some(id) if id.physical.is_some() => Ok(ComputeDevice {
                    device,
                    backend: "wgpu",
                    adapter: id.name,
                }),
                _ => Ok(ComputeDevice::cpu()),
            }
        }
        DeviceChoice::Cuda => cuda(0),
    }
}

/// The devices of `--devices`: a comma-separated list of `cpu`, `wgpu` (the default adapter,
/// software ones included), `wgpu:N` (the N-th hardware GPU, best first) and `cuda:N`. A
/// device that is not there is an error naming it.
pub fn parse_list(list: &str) -> Result<Vec<ComputeDevice>> {
    let mut devices = Vec::new();
    for spec in list.split(',').map(str::trim) {
        let (kind, index) = match spec.split_once(':') {
            Some((kind, index)) => {
                let index = index.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!(
                        "--devices: `{spec}` is not a device: its index must be a number"
                    )
                })?;
                (kind, Some(index))
            }
            None => (spec, None),
        };
        devices.push(match (kind, index) {
            ("cpu", None) => ComputeDevice::cpu(),
            ("wgpu", None) => select(DeviceChoice::Wgpu)?,
            ("wgpu", Some(n)) => hardware_gpu(n).map_err(|count| {
                anyhow::anyhow!(
                    "--devices: `{spec}` is not there: this machine has {count} hardware GPU{} for wgpu",
                    if count == 1 { "" } else { "s" }
                )
            })?,
            ("cuda", n) => cuda(n.unwrap_or(0)).map_err(|e| anyhow::anyhow!("--devices: {e}"))?,
            _ => anyhow::bail!(
                "--devices: `{spec}` is not a device: use cpu, wgpu, wgpu:N or cuda:N, separated by commas"
            ),
        });
    }
    if devices.len() < 2 {
        anyhow::bail!("--devices takes two devices or more; for one, use --device");
    }
    Ok(devices)
}

/// The `n`-th hardware GPU of [`hardware_adapters`] (best first), or how many there are.
fn hardware_gpu(n: usize) -> std::result::Result<ComputeDevice, usize> {
    let adapters = hardware_adapters();
    let info = adapters.get(n).ok_or(adapters.len())?;
    // burn numbers adapters within their type.
    let within_type = adapters[..n]
        .iter()
        .filter(|a| a.device_type == info.device_type)
        .count();
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(within_type),
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(within_type),
        _ => DeviceKind::VirtualGpu(within_type),
    };
    Ok(ComputeDevice {
        device: Device::wgpu(kind),
        backend: "wgpu",
        adapter: info.name.clone(),
    })
}

/// [`select`] for this process as a rank of an MPI job: ranks on one machine take its GPUs in
/// turn (`--device cuda`: CUDA device `local_rank`; `auto` or `wgpu` with several hardware
/// GPUs: GPU `local_rank` modulo their number), so `mpirun -n 4` on a 4-GPU machine uses all
/// four. The CPU is shared. Outside a launcher, the local rank is 0: [`select`] itself.
pub fn select_for_this_rank(choice: DeviceChoice) -> Result<ComputeDevice> {
    let local_rank = crate::train::collective::launcher_local_rank();
    match choice {
        DeviceChoice::Cuda => cuda(local_rank),
        DeviceChoice::Auto | DeviceChoice::Wgpu if local_rank > 0 => {
            let count = hardware_adapters().len();
            match count {
                0 | 1 => select(choice),
                _ => hardware_gpu(local_rank % count)
                    .map_err(|_| anyhow::anyhow!("the GPUs changed while kiln started")),
            }
        }
        _ => select(choice),
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<ComputeDevice> {
    // `Device::cuda(n)` of a device that is not there panics at its first use; the driver's
    // count (zero without a driver, and no panic) turns that into a message.
    let count = Device::enumerate(burn::tensor::DeviceType::Cuda).len();
    if index >= count {
        anyhow::bail!(
            "`cuda:{index}` is not there: {}",
            match count {
                0 => "no CUDA device was found (is the NVIDIA driver installed?)".to_string(),
                1 => "this machine has 1 CUDA device (cuda:0)".to_string(),
                n => format!(
                    "this machine has {n} CUDA devices (cuda:0 to cuda:{})",
                    n - 1
                ),
            }
        );
    }
    let device = Device::cuda(index);
    let adapter = device
        .identity()
        .map(|id| id.name)
        .unwrap_or_else(|| format!("CUDA device {index}"));
    Ok(ComputeDevice {
        device,
        backend: "cuda",
        adapter,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<ComputeDevice> {
    anyhow::bail!("CUDA needs kiln built with `--features cuda` (docs/distributed.md)")
}
