//! Memory and swap, in MiB.

use rollcall::heartbeat::Memory;
use sysinfo::{MemoryRefreshKind, System};

const MIB: u64 = 1024 * 1024;

pub struct MemorySource {
    system: System,
}

impl MemorySource {
    pub fn new() -> Self {
        Self {
            system: System::new(),
        }
    }

    pub fn sample(&mut self) -> Memory {
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        let total_mb = self.system.total_memory() / MIB;
        let swap_total_mb = self.system.total_swap() / MIB;
        Memory {
            total_mb,
            available_mb: (self.system.available_memory() / MIB).min(total_mb),
            swap_total_mb: Some(swap_total_mb),
            swap_used_mb: Some((self.system.used_swap() / MIB).min(swap_total_mb)),
        }
    }
}

impl Default for MemorySource {
    fn default() -> Self {
        Self::new()
    }
}
