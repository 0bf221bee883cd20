//! AMD GPUs through the amdgpu driver's sysfs files.

use std::path::{Path, PathBuf};

use rollcall::heartbeat::{Gpu, Vendor};

use super::GpuSource;

const MIB: u64 = 1024 * 1024;

pub struct SysfsSource {
    root: PathBuf,
}

impl Default for SysfsSource {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys/class/drm"),
        }
    }
}

impl SysfsSource {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl GpuSource for SysfsSource {
    fn name(&self) -> &'static str {
        "amd"
    }

    fn read(&mut self) -> Result<Vec<Gpu>, String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(Vec::new());
        };
        // Only `cardN` itself: `cardN-DP-1` and the like are its connectors.
        let mut cards: Vec<(u32, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let number = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix("card")?
                    .parse()
                    .ok()?;
                Some((number, entry.path().join("device")))
            })
            .filter(|(_, device)| device.join("mem_info_vram_total").exists())
            .collect();
        cards.sort_by_key(|(number, _)| *number);
        let mut gpus = Vec::new();
        for (position, (_, device)) in cards.iter().enumerate() {
            match read_card(device) {
                Ok((total, used)) => gpus.push(Gpu {
                    index: position as u32,
                    vendor: Vendor::Amd,
                    name: read_text(&device.join("product_name")),
                    uuid: read_text(&device.join("unique_id")),
                    memory_total_mb: total / MIB,
                    memory_free_mb: total.saturating_sub(used) / MIB,
                    utilization_percent: read_text(&device.join("gpu_busy_percent"))
                        .and_then(|text| text.parse::<f64>().ok())
                        .map(|percent| percent.clamp(0.0, 100.0)),
                    temperature_c: None,
                    power_w: None,
                    // amdgpu shows a process's VRAM only in each of its DRM
                    // file descriptors' fdinfo: finding them means reading
                    // every process's fd folder each heartbeat, so AMD GPUs
                    // report processes as unknown (docs: README "GPU processes").
                    processes: None,
                }),
                Err(error) => {
                    tracing::warn!(device = %device.display(), %error, "cannot read AMD GPU; sending without it")
                }
            }
        }
        Ok(gpus)
    }
}

fn read_card(device: &Path) -> Result<(u64, u64), String> {
    let number = |name: &str| -> Result<u64, String> {
        let path = device.join(name);
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        text.trim()
            .parse()
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    Ok((
        number("mem_info_vram_total")?,
        number("mem_info_vram_used")?,
    ))
}

fn read_text(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vram_from_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let card = root.path().join("card1/device");
        std::fs::create_dir_all(&card).unwrap();
        std::fs::write(card.join("mem_info_vram_total"), "17163091968\n").unwrap();
        std::fs::write(card.join("mem_info_vram_used"), "1073741824\n").unwrap();
        std::fs::write(card.join("product_name"), "Radeon RX 7900\n").unwrap();
        std::fs::create_dir_all(root.path().join("card1-DP-1")).unwrap();
        std::fs::create_dir_all(root.path().join("card0/device")).unwrap(); // no VRAM files: not amdgpu
        let gpus = SysfsSource::at(root.path()).read().unwrap();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].memory_total_mb, 16368);
        assert_eq!(gpus[0].memory_free_mb, 15344);
        assert_eq!(gpus[0].name.as_deref(), Some("Radeon RX 7900"));
    }

    #[test]
    fn no_drm_folder_means_no_gpus() {
        assert!(SysfsSource::at("/no/such/drm").read().unwrap().is_empty());
    }
}
