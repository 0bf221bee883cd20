//! Host name, operating system and uptime.

use std::sync::OnceLock;

use rollcall::heartbeat::Host;
use sysinfo::System;

pub fn sample() -> Host {
    // Neither changes while the collector runs, and reading them costs file I/O.
    static FIXED: OnceLock<(Option<String>, Option<String>)> = OnceLock::new();
    let (hostname, os) = FIXED.get_or_init(|| (System::host_name(), System::long_os_version()));
    Host {
        hostname: hostname.clone(),
        os: os.clone(),
        uptime_s: Some(System::uptime()),
    }
}
