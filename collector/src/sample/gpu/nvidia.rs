//! NVIDIA GPUs through NVML, loaded at run time.
//!
//! NVML is initialised once and kept. A host without the library or driver
//! reports no NVIDIA GPUs, says so once at info level, and never tries again.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use rollcall::heartbeat::{Gpu, Vendor};

use super::GpuSource;
use super::processes::ProcessNames;

const MIB: u64 = 1024 * 1024;

enum State {
    Uninitialised,
    Ready(Box<Nvml>),
    /// No library or driver: there will not be one until the host changes.
    Absent,
}

pub struct NvmlSource {
    state: State,
    once: bool,
    processes: ProcessNames,
}

impl NvmlSource {
    /// `once`: the `once` subcommand (run from cron), where "no NVIDIA
    /// driver" is expected news every minute and is logged at debug only. `process_names`: whether
    /// GPU processes go out with their names and users.
    pub fn new(once: bool, process_names: bool) -> Self {
        Self {
            state: State::Uninitialised,
            once,
            processes: ProcessNames::new(process_names),
        }
    }

    fn nvml(&mut self) -> Result<Option<&Nvml>, String> {
        if let State::Uninitialised = self.state {
            match Nvml::init() {
                Ok(nvml) => {
                    let driver = nvml
                        .sys_driver_version()
                        .unwrap_or_else(|_| "unknown".into());
                    tracing::info!(driver = %driver, "NVML initialised");
                    self.state = State::Ready(Box::new(nvml));
                }
                Err(error) if is_absent(&error) => {
                    if self.once {
                        tracing::debug!(reason = %error, "no NVIDIA driver found; reporting no NVIDIA GPUs");
                    } else {
                        tracing::info!(reason = %error, "no NVIDIA driver found; reporting no NVIDIA GPUs");
                    }
                    self.state = State::Absent;
                }
                // Anything else may be passing (a driver still loading); try again next sample.
                Err(error) => return Err(format!("NVML init failed: {error}")),
            }
        }
        match &self.state {
            State::Ready(nvml) => Ok(Some(nvml)),
            _ => Ok(None),
        }
    }
}

impl GpuSource for NvmlSource {
    fn name(&self) -> &'static str {
        "nvidia"
    }

    fn read(&mut self) -> Result<Vec<Gpu>, String> {
        self.nvml()?;
        let State::Ready(nvml) = &self.state else {
            return Ok(Vec::new());
        };
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            match read_device(nvml, index, &mut self.processes) {
                Ok(gpu) => gpus.push(gpu),
                Err(error) => {
                    tracing::warn!(index, %error, "cannot read NVIDIA GPU; sending without it")
                }
            }
        }
        Ok(gpus)
    }
}

fn read_device(nvml: &Nvml, index: u32, names: &mut ProcessNames) -> Result<Gpu, NvmlError> {
    let device = nvml.device_by_index(index)?;
    let memory = device.memory_info()?;
    // Compute (CUDA) and graphics contexts are listed apart. A GPU whose
    // lists cannot be read (old drivers, MIG without privileges) reports
    // them as unknown, not as none.
    let compute = device.running_compute_processes();
    let graphics = device.running_graphics_processes();
    let processes = match (compute, graphics) {
        (Err(error), Err(_)) => {
            tracing::debug!(index, %error, "GPU processes not readable");
            None
        }
        (compute, graphics) => {
            let listed = compute
                .unwrap_or_default()
                .into_iter()
                .chain(graphics.unwrap_or_default());
            Some(names.describe(listed.map(|process| {
                let used = match process.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes / MIB,
                    UsedGpuMemory::Unavailable => 0,
                };
                (process.pid, used)
            })))
        }
    };
    // The remaining figures are for diagnosis; a GPU that lacks one still counts.
    Ok(Gpu {
        index,
        vendor: Vendor::Nvidia,
        name: device.name().ok(),
        uuid: device.uuid().ok(),
        memory_total_mb: memory.total / MIB,
        memory_free_mb: (memory.free / MIB).min(memory.total / MIB),
        utilization_percent: device
            .utilization_rates()
            .ok()
            .map(|rates| f64::from(rates.gpu.min(100))),
        temperature_c: device
            .temperature(TemperatureSensor::Gpu)
            .ok()
            .map(f64::from),
        power_w: device
            .power_usage()
            .ok()
            .map(|milliwatts| f64::from(milliwatts) / 1000.0),
        processes,
    })
}

fn is_absent(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::LibloadingError(_)
            | NvmlError::DriverNotLoaded
            | NvmlError::LibraryNotFound
            | NvmlError::NoPermission
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without an NVIDIA driver (CI) this is the real "absent" path;
    /// on a GPU host it reads real devices. Either way it must not error.
    #[test]
    fn reads_without_error_whether_or_not_a_driver_is_present() {
        let mut source = NvmlSource::new(false, true);
        let gpus = source.read().expect("NVML absence is not an error");
        for gpu in &gpus {
            assert!(gpu.memory_free_mb <= gpu.memory_total_mb);
        }
        if std::path::Path::new("/proc/driver/nvidia/version").exists() {
            assert!(matches!(source.state, State::Ready(_)));
        } else {
            assert!(gpus.is_empty());
            assert!(matches!(source.state, State::Absent));
        }
    }
}
