//! The v1 heartbeat body (PROTOCOL.md §1, "Body") and its range checks.
//!
//! The collector serialises these types and ingest parses them, so both ends
//! agree on every field name and unit by construction.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::signing::{AGENT_ID_RULE, id_rule, is_valid_agent_id, is_valid_id};

pub const PROTOCOL_VERSION: u32 = 1;
pub const MAX_GPUS: usize = 16;
// The name rules live in `names`; the heartbeat is where most callers met them.
pub use crate::names::{
    LABEL_VALUE_RULE, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_POOL_LEN,
    is_valid_label_value,
};
/// Host names, OS names, GPU names and UUIDs, disk paths.
pub const MAX_TEXT_LEN: usize = 256;
pub const DEFAULT_POOL: &str = "default";
/// 2^53: the largest integer every JSON reader holds exactly.
pub const MAX_SAFE_INTEGER: u64 = 1 << 53;
/// Bodies above this are refused before they are parsed.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    pub agent_id: String,
    pub sent_at_ms: u64,
    pub interval_s: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub state: AgentState,
    #[serde(default = "default_pool", deserialize_with = "null_as_default_pool")]
    pub pool: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<Host>,
    pub cpu: Cpu,
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Disk>,
    pub gpus: Vec<Gpu>,
    /// Per-minute roll-ups of recent samples, sent every few minutes
    /// (an addition to v1: older ingests ignore it).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub history: Vec<MinuteRollup>,
    /// The collector's own cost on its machine (an addition to v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<CollectorCost>,
}

/// What the collector itself uses on its machine, so that its overhead can
/// be watched across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollectorCost {
    /// Resident memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_mb: Option<f64>,
    /// CPU time, user and system, since the collector started, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
}

/// One minute of an agent's samples, rolled up by its collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinuteRollup {
    /// Unix time in whole minutes.
    pub minute: u64,
    pub load_1m: Spread,
    pub memory_available_mb: Spread,
    /// The least free VRAM each GPU had in the minute, by GPU position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_free_mb_min: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    #[default]
    Up,
    /// Online, but its operator asks schedulers to place no new work on it
    /// (PROTOCOL.md §3): `GET /v1/agents` leaves it out unless
    /// `include_draining=true`.
    Draining,
    /// The last heartbeat of a collector that is shutting down.
    Leaving,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Host {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    pub cores_physical: u32,
    pub cores_logical: u32,
    pub cores_available: u32,
    pub load_1m: f64,
    pub load_5m: f64,
    pub load_15m: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_percent: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub total_mb: u64,
    pub available_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_total_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_used_mb: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_gb: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_gb: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Nvidia,
    Amd,
    Intel,
    Other,
}

impl Vendor {
    pub const ALL: [Vendor; 4] = [Vendor::Nvidia, Vendor::Amd, Vendor::Intel, Vendor::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Nvidia => "nvidia",
            Vendor::Amd => "amd",
            Vendor::Intel => "intel",
            Vendor::Other => "other",
        }
    }

    pub fn parse(text: &str) -> Option<Vendor> {
        Vendor::ALL.into_iter().find(|v| v.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub vendor: Vendor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub memory_total_mb: u64,
    pub memory_free_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// The processes holding its memory, largest first (PROTOCOL.md §4 "GPU
    /// processes"): `None` when the collector does not report them this
    /// time (they are unchanged, or unknown), `Some([])` when there are none.
    /// Stored apart from the record ([`GpuProcesses`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<GpuProcess>>,
}

/// Most processes one GPU reports.
pub const MAX_GPU_PROCESSES: usize = 32;
/// Longest process name or user name.
pub const MAX_PROCESS_TEXT_LEN: usize = 64;

/// One process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory it holds, MiB.
    pub used_mb: u64,
    /// Its command name, unless the collector is told to send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Who runs it, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What a heartbeat said of its GPUs' processes, by GPU index: kept apart
/// from the agent record (an extension of PROTOCOL.md §3), so that a
/// record stays one small item however many processes a host runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcesses {
    /// The heartbeat's `sent_at_ms`: a snapshot replaces only an older one.
    pub sent_at_ms: u64,
    pub gpus: BTreeMap<u32, Vec<GpuProcess>>,
}

impl Heartbeat {
    /// Takes the processes out of the heartbeat: `None` when it reported
    /// none for any GPU (nothing to store).
    pub fn take_processes(&mut self) -> Option<GpuProcesses> {
        let mut gpus = BTreeMap::new();
        for gpu in &mut self.gpus {
            if let Some(processes) = gpu.processes.take() {
                gpus.insert(gpu.index, processes);
            }
        }
        (!gpus.is_empty()).then_some(GpuProcesses {
            sent_at_ms: self.sent_at_ms,
            gpus,
        })
    }
}

/// Why a body was refused: the offending field's path and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BodyError {
    pub field: String,
    pub message: String,
}

impl BodyError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Heartbeat {
    /// Parses and range-checks a body (PROTOCOL.md §1, check 3, except the
    /// header comparison, which needs the request).
    pub fn parse(body: &[u8]) -> Result<Heartbeat, BodyError> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let heartbeat: Heartbeat =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
                let path = error.path().to_string();
                let field = if path == "." { "body".to_owned() } else { path };
                BodyError::new(field, strip_position(&error.into_inner().to_string()))
            })?;
        deserializer
            .end()
            .map_err(|e| BodyError::new("body", strip_position(&e.to_string())))?;
        heartbeat.validate()?;
        Ok(heartbeat)
    }

    /// Every range check of PROTOCOL.md §1 check 3, section by section; the
    /// first failure names its field.
    pub fn validate(&self) -> Result<(), BodyError> {
        self.validate_identity()?;
        self.validate_names()?;
        self.validate_cpu()?;
        self.validate_memory_and_disk()?;
        self.validate_collector()?;
        self.validate_history()?;
        self.validate_gpus()
    }

    /// Version, agent id, times and integer ranges.
    fn validate_identity(&self) -> Result<(), BodyError> {
        if self.v != PROTOCOL_VERSION {
            return Err(BodyError::new(
                "v",
                format!(
                    "unsupported protocol version {}, expected {PROTOCOL_VERSION}",
                    self.v
                ),
            ));
        }
        if !is_valid_agent_id(&self.agent_id) {
            return Err(BodyError::new("agent_id", AGENT_ID_RULE));
        }
        if self.sent_at_ms == 0 {
            return Err(BodyError::new(
                "sent_at_ms",
                "must be a positive Unix time in milliseconds",
            ));
        }
        for (field, value) in self.integer_figures() {
            if value > MAX_SAFE_INTEGER {
                return Err(BodyError::new(
                    field,
                    format!("{value} is out of range (at most 2^53)"),
                ));
            }
        }
        if self.interval_s == 0 {
            return Err(BodyError::new("interval_s", "must be at least 1"));
        }
        Ok(())
    }

    /// Pool, labels and every free text: bounded, printable.
    fn validate_names(&self) -> Result<(), BodyError> {
        if !is_valid_id(&self.pool, MAX_POOL_LEN) {
            return Err(BodyError::new("pool", id_rule(MAX_POOL_LEN)));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(BodyError::new(
                "labels",
                format!("at most {MAX_LABELS} labels, got {}", self.labels.len()),
            ));
        }
        for (key, value) in &self.labels {
            crate::names::check_label(key, value)
                .map_err(|why| BodyError::new(format!("labels.{key}"), why))?;
        }

        for (field, value) in self.free_texts() {
            if value.chars().count() > MAX_TEXT_LEN || value.chars().any(char::is_control) {
                return Err(BodyError::new(
                    field,
                    format!(
                        "must be at most {MAX_TEXT_LEN} characters, none of them control characters"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Loads, usage and core counts that agree with each other.
    fn validate_cpu(&self) -> Result<(), BodyError> {
        let cpu = &self.cpu;
        for (name, value) in [
            ("cpu.load_1m", cpu.load_1m),
            ("cpu.load_5m", cpu.load_5m),
            ("cpu.load_15m", cpu.load_15m),
        ] {
            non_negative(name, value)?;
        }
        if let Some(usage) = cpu.usage_percent {
            percent("cpu.usage_percent", usage)?;
        }
        if cpu.cores_logical == 0 {
            return Err(BodyError::new("cpu.cores_logical", "must be at least 1"));
        }
        if cpu.cores_physical > cpu.cores_logical {
            return Err(BodyError::new(
                "cpu.cores_physical",
                "must not exceed cpu.cores_logical",
            ));
        }
        if cpu.cores_available > cpu.cores_logical {
            return Err(BodyError::new(
                "cpu.cores_available",
                "must not exceed cpu.cores_logical",
            ));
        }
        Ok(())
    }

    /// Free never above total.
    fn validate_memory_and_disk(&self) -> Result<(), BodyError> {
        let memory = &self.memory;
        at_most(
            "memory.available_mb",
            memory.available_mb,
            "memory.total_mb",
            memory.total_mb,
        )?;
        if let (Some(used), Some(total)) = (memory.swap_used_mb, memory.swap_total_mb) {
            at_most("memory.swap_used_mb", used, "memory.swap_total_mb", total)?;
        }

        if let Some(disk) = &self.disk {
            if let Some(total) = disk.total_gb {
                non_negative("disk.total_gb", total)?;
            }
            if let Some(free) = disk.free_gb {
                non_negative("disk.free_gb", free)?;
                if disk.total_gb.is_some_and(|total| free > total) {
                    return Err(BodyError::new(
                        "disk.free_gb",
                        "must not exceed disk.total_gb",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The collector's own cost, within bounds far past any real one.
    fn validate_collector(&self) -> Result<(), BodyError> {
        if let Some(collector) = &self.collector {
            // Bounds far past any real collector (1 TiB resident, 300 years of CPU).
            for (field, value, max) in [
                ("collector.rss_mb", collector.rss_mb, 1_048_576.0),
                ("collector.cpu_s", collector.cpu_s, 1e10),
            ] {
                if let Some(value) = value {
                    non_negative(field, value)?;
                    if value > max {
                        return Err(BodyError::new(
                            field,
                            format!("{value} is out of range (at most {max})"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// At most 16 GPUs with distinct indexes, free never above total.
    fn validate_gpus(&self) -> Result<(), BodyError> {
        if self.gpus.len() > MAX_GPUS {
            return Err(BodyError::new(
                "gpus",
                format!("at most {MAX_GPUS} GPUs, got {}", self.gpus.len()),
            ));
        }
        for (position, gpu) in self.gpus.iter().enumerate() {
            let field = |name: &str| format!("gpus[{position}].{name}");
            if gpu.memory_free_mb > gpu.memory_total_mb {
                return Err(BodyError::new(
                    field("memory_free_mb"),
                    "must not exceed memory_total_mb",
                ));
            }
            if let Some(utilization) = gpu.utilization_percent {
                percent(&field("utilization_percent"), utilization)?;
            }
            if let Some(temperature) = gpu.temperature_c {
                non_negative(&field("temperature_c"), temperature)?;
            }
            if let Some(power) = gpu.power_w {
                non_negative(&field("power_w"), power)?;
            }
            validate_processes(position, gpu.processes.as_deref().unwrap_or_default())?;
            if self.gpus[..position]
                .iter()
                .any(|other| other.index == gpu.index)
            {
                return Err(BodyError::new(
                    field("index"),
                    format!("duplicate GPU index {}", gpu.index),
                ));
            }
        }
        Ok(())
    }

    fn validate_history(&self) -> Result<(), BodyError> {
        if self.history.len() > crate::history::MAX_MINUTES_PER_HEARTBEAT {
            return Err(BodyError::new(
                "history",
                format!(
                    "at most {} minutes, got {}",
                    crate::history::MAX_MINUTES_PER_HEARTBEAT,
                    self.history.len()
                ),
            ));
        }
        let sent_minute = self.sent_at_ms / 60_000;
        for (position, rollup) in self.history.iter().enumerate() {
            let field = |name: &str| format!("history[{position}].{name}");
            if rollup.minute > sent_minute {
                return Err(BodyError::new(field("minute"), "is after sent_at_ms"));
            }
            if position > 0 && rollup.minute <= self.history[position - 1].minute {
                return Err(BodyError::new(
                    field("minute"),
                    "minutes must be strictly increasing",
                ));
            }
            for (name, spread) in [
                ("load_1m", rollup.load_1m),
                ("memory_available_mb", rollup.memory_available_mb),
            ] {
                for value in [spread.min, spread.avg, spread.max] {
                    non_negative(&field(name), value)?;
                }
                // Averages of floats may round a hair past their bounds.
                let slack = 1e-9 * spread.max.abs().max(1.0);
                if spread.min > spread.avg + slack || spread.avg > spread.max + slack {
                    return Err(BodyError::new(
                        field(name),
                        "must satisfy min <= avg <= max",
                    ));
                }
            }
            if rollup.gpu_free_mb_min.len() > MAX_GPUS {
                return Err(BodyError::new(
                    field("gpu_free_mb_min"),
                    format!("at most {MAX_GPUS} GPUs"),
                ));
            }
            if let Some(value) = rollup
                .gpu_free_mb_min
                .iter()
                .find(|value| **value > MAX_SAFE_INTEGER)
            {
                return Err(BodyError::new(
                    field("gpu_free_mb_min"),
                    format!("{value} is out of range"),
                ));
            }
        }
        Ok(())
    }

    /// Descriptive strings: shown to people, so bounded and printable.
    fn free_texts(&self) -> Vec<(String, &str)> {
        let mut texts = Vec::new();
        if let Some(host) = &self.host {
            texts.extend(
                host.hostname
                    .as_deref()
                    .map(|text| ("host.hostname".to_owned(), text)),
            );
            texts.extend(host.os.as_deref().map(|text| ("host.os".to_owned(), text)));
        }
        if let Some(path) = self.disk.as_ref().and_then(|disk| disk.path.as_deref()) {
            texts.push(("disk.path".to_owned(), path));
        }
        for (position, gpu) in self.gpus.iter().enumerate() {
            texts.extend(
                gpu.name
                    .as_deref()
                    .map(|text| (format!("gpus[{position}].name"), text)),
            );
            texts.extend(
                gpu.uuid
                    .as_deref()
                    .map(|text| (format!("gpus[{position}].uuid"), text)),
            );
        }
        texts
    }

    /// Integer figures a store must hold exactly; JSON's safe range bounds them.
    fn integer_figures(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let fixed = [
            ("sent_at_ms", self.sent_at_ms),
            ("memory.total_mb", self.memory.total_mb),
            ("memory.available_mb", self.memory.available_mb),
            (
                "memory.swap_total_mb",
                self.memory.swap_total_mb.unwrap_or(0),
            ),
            ("memory.swap_used_mb", self.memory.swap_used_mb.unwrap_or(0)),
            (
                "host.uptime_s",
                self.host
                    .as_ref()
                    .and_then(|host| host.uptime_s)
                    .unwrap_or(0),
            ),
        ];
        fixed
            .into_iter()
            .map(|(field, value)| (field.to_owned(), value))
            .chain(self.gpus.iter().enumerate().flat_map(|(position, gpu)| {
                [
                    (
                        format!("gpus[{position}].memory_total_mb"),
                        gpu.memory_total_mb,
                    ),
                    (
                        format!("gpus[{position}].memory_free_mb"),
                        gpu.memory_free_mb,
                    ),
                ]
            }))
    }

    /// The most free VRAM on any one GPU, in MiB: the order of capacity answers.
    pub fn max_gpu_free_mb(&self) -> u64 {
        self.gpus
            .iter()
            .map(|gpu| gpu.memory_free_mb)
            .max()
            .unwrap_or(0)
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), BodyError> {
    if !value.is_finite() || value < 0.0 {
        return Err(BodyError::new(
            field,
            format!("must be a finite number >= 0, got {value}"),
        ));
    }
    Ok(())
}

fn percent(field: &str, value: f64) -> Result<(), BodyError> {
    non_negative(field, value)?;
    if value > 100.0 {
        return Err(BodyError::new(
            field,
            format!("must be at most 100, got {value}"),
        ));
    }
    Ok(())
}

fn at_most(field: &str, value: u64, limit_field: &str, limit: u64) -> Result<(), BodyError> {
    if value > limit {
        return Err(BodyError::new(
            field,
            format!("{value} exceeds {limit_field} ({limit})"),
        ));
    }
    Ok(())
}

/// serde_json appends " at line 1 column 57"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

fn default_pool() -> String {
    DEFAULT_POOL.to_owned()
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn null_as_default_pool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_else(default_pool))
}

/// At most 32 processes on a GPU, distinct pids, names and users bounded
/// and printable.
fn validate_processes(gpu: usize, processes: &[GpuProcess]) -> Result<(), BodyError> {
    let field = |name: String| format!("gpus[{gpu}].processes{name}");
    if processes.len() > MAX_GPU_PROCESSES {
        return Err(BodyError::new(
            field(String::new()),
            format!(
                "at most {MAX_GPU_PROCESSES} processes per GPU (the largest), got {}",
                processes.len()
            ),
        ));
    }
    for (position, process) in processes.iter().enumerate() {
        if process.used_mb > MAX_SAFE_INTEGER {
            return Err(BodyError::new(
                field(format!("[{position}].used_mb")),
                "is out of range (at most 2^53)",
            ));
        }
        for (name, text) in [("name", &process.name), ("user", &process.user)] {
            let bad = |text: &String| {
                text.is_empty()
                    || text.chars().count() > MAX_PROCESS_TEXT_LEN
                    || text.chars().any(char::is_control)
            };
            if text.as_ref().is_some_and(bad) {
                return Err(BodyError::new(
                    field(format!("[{position}].{name}")),
                    format!(
                        "must be 1-{MAX_PROCESS_TEXT_LEN} characters, none of them control characters"
                    ),
                ));
            }
        }
        if processes[..position]
            .iter()
            .any(|other| other.pid == process.pid)
        {
            return Err(BodyError::new(
                field(format!("[{position}].pid")),
                format!("pid {} is listed twice", process.pid),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The example body of PROTOCOL.md §1.
    pub fn example() -> Value {
        json!({
          "v": 1, "agent_id": "lab-07", "sent_at_ms": 1764132000123u64, "interval_s": 30,
          "state": "up", "pool": "default", "labels": {"site": "b2"},
          "host": {"hostname": "lab-07", "os": "Debian GNU/Linux 12", "uptime_s": 86400},
          "cpu": {"cores_physical": 8, "cores_logical": 16, "cores_available": 6,
                  "load_1m": 1.9, "load_5m": 1.2, "load_15m": 0.8, "usage_percent": 23.5},
          "memory": {"total_mb": 64000, "available_mb": 41000, "swap_total_mb": 2048, "swap_used_mb": 0},
          "disk": {"path": "/", "total_gb": 931.5, "free_gb": 402.2},
          "gpus": [{"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
                    "uuid": "GPU-5f1c", "memory_total_mb": 24564, "memory_free_mb": 20110,
                    "utilization_percent": 7, "temperature_c": 41, "power_w": 31.5}]
        })
    }

    fn parse(value: &Value) -> Result<Heartbeat, BodyError> {
        Heartbeat::parse(value.to_string().as_bytes())
    }

    fn field_of(mut value: Value, edit: impl FnOnce(&mut Value)) -> String {
        edit(&mut value);
        parse(&value).expect_err("should be refused").field
    }

    #[test]
    fn gpu_processes_are_bounded_and_taken_out_whole() {
        let with = |processes: Value| {
            let mut body = example();
            body["gpus"][0]["processes"] = processes;
            body
        };
        let mut heartbeat = parse(&with(json!([
            {"pid": 4242, "used_mb": 18000, "name": "python3", "user": "alice"},
            {"pid": 77, "used_mb": 300}
        ])))
        .unwrap();
        let taken = heartbeat.take_processes().expect("processes were sent");
        assert_eq!(taken.sent_at_ms, heartbeat.sent_at_ms);
        assert_eq!(taken.gpus[&0][0].name.as_deref(), Some("python3"));
        assert!(
            heartbeat.gpus[0].processes.is_none(),
            "taken out of the record"
        );
        assert!(parse(&example()).unwrap().take_processes().is_none());
        // An empty list is news too: no process holds memory any more.
        let none = parse(&with(json!([]))).unwrap().take_processes().unwrap();
        assert_eq!(none.gpus[&0], []);
        for processes in [
            json!(
                (0..33)
                    .map(|pid| json!({"pid": pid, "used_mb": 1}))
                    .collect::<Vec<_>>()
            ),
            json!([{"pid": 1, "used_mb": 1, "name": "a\u{7}b"}]),
            json!([{"pid": 1, "used_mb": 1, "name": ""}]),
            json!([{"pid": 1, "used_mb": 1, "user": "u".repeat(65)}]),
            json!([{"pid": 1, "used_mb": 1}, {"pid": 1, "used_mb": 2}]),
            json!([{"pid": 1, "used_mb": 9007199254740993u64}]),
        ] {
            let error = parse(&with(processes.clone())).expect_err(&processes.to_string());
            assert!(
                error.field.starts_with("gpus[0].processes"),
                "{processes}: {error}"
            );
        }
    }

    #[test]
    fn protocol_example_parses() {
        let heartbeat = parse(&example()).unwrap();
        assert_eq!(heartbeat.agent_id, "lab-07");
        assert_eq!(heartbeat.gpus[0].vendor, Vendor::Nvidia);
        assert_eq!(heartbeat.max_gpu_free_mb(), 20110);
    }

    #[test]
    fn optional_fields_default_when_omitted_or_null() {
        let mut body = example();
        let object = body.as_object_mut().unwrap();
        for key in ["host", "disk", "labels"] {
            object.remove(key);
        }
        object.insert("state".into(), Value::Null);
        object.insert("pool".into(), Value::Null);
        object.insert("unknown_future_field".into(), json!({"x": 1}));
        let heartbeat = parse(&body).unwrap();
        assert_eq!(heartbeat.state, AgentState::Up);
        assert_eq!(heartbeat.pool, "default");
        assert!(heartbeat.labels.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(example(), |b| {
                b["cpu"].as_object_mut().unwrap().remove("load_1m");
            }),
            "cpu"
        );
        assert_eq!(
            field_of(example(), |b| b["cpu"]["load_1m"] = json!(-1.0)),
            "cpu.load_1m"
        );
        assert_eq!(
            field_of(example(), |b| b["cpu"]["cores_physical"] = json!(-1)),
            "cpu.cores_physical"
        );
        assert_eq!(
            field_of(example(), |b| b["memory"]["available_mb"] = json!(64001)),
            "memory.available_mb"
        );
        assert_eq!(
            field_of(example(), |b| b["gpus"][0]["memory_free_mb"] = json!(30000)),
            "gpus[0].memory_free_mb"
        );
        assert_eq!(
            field_of(example(), |b| b["gpus"][0]["vendor"] = json!("3dfx")),
            "gpus[0].vendor"
        );
        assert_eq!(field_of(example(), |b| b["state"] = json!("gone")), "state");
        assert_eq!(field_of(example(), |b| b["v"] = json!(2)), "v");
        assert_eq!(
            field_of(example(), |b| b["agent_id"] = json!("a/b")),
            "agent_id"
        );
        assert_eq!(
            field_of(example(), |b| b["gpus"] =
                json!(vec![b["gpus"][0].clone(); 17])),
            "gpus"
        );
    }

    #[test]
    fn missing_field_message_names_it() {
        let mut body = example();
        body["cpu"].as_object_mut().unwrap().remove("load_1m");
        let error = parse(&body).unwrap_err();
        assert!(error.message.contains("load_1m"), "{error}");
    }

    #[test]
    fn too_many_labels_and_bad_label_keys_are_refused() {
        let labels: serde_json::Map<String, Value> =
            (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            field_of(example(), |b| b["labels"] = Value::Object(labels)),
            "labels"
        );
        assert_eq!(
            field_of(example(), |b| b["labels"] = json!({"a b": "x"})),
            "labels.a b"
        );
    }

    #[test]
    fn descriptive_strings_are_bounded_and_printable() {
        assert_eq!(
            field_of(example(), |b| b["host"]["hostname"] = json!("lab\u{0}07")),
            "host.hostname"
        );
        assert_eq!(
            field_of(example(), |b| b["gpus"][0]["name"] = json!("x".repeat(257))),
            "gpus[0].name"
        );
        assert_eq!(
            field_of(example(), |b| b["disk"]["path"] = json!("/\n")),
            "disk.path"
        );
    }

    #[test]
    fn duplicate_keys_deep_nesting_and_bad_utf8_are_refused() {
        let duplicated = example()
            .to_string()
            .replacen("{", "{\"agent_id\":\"other\",", 1);
        assert!(
            Heartbeat::parse(duplicated.as_bytes())
                .unwrap_err()
                .message
                .contains("duplicate field")
        );
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(Heartbeat::parse(nested.as_bytes()).is_err());
        let mut invalid = example().to_string().into_bytes();
        let at = invalid.windows(6).position(|w| w == b"lab-07").unwrap();
        invalid[at] = 0xff;
        assert!(Heartbeat::parse(&invalid).is_err());
    }

    #[test]
    fn the_collectors_own_cost_is_optional_and_checked() {
        let mut body = example();
        body["collector"] = json!({"rss_mb": 4.5, "cpu_s": 0.25});
        let heartbeat = parse(&body).unwrap();
        assert_eq!(heartbeat.collector.unwrap().rss_mb, Some(4.5));
        assert!(parse(&example()).unwrap().collector.is_none());
        assert_eq!(
            field_of(example(), |b| b["collector"] = json!({"rss_mb": -1.0})),
            "collector.rss_mb"
        );
        assert_eq!(
            field_of(example(), |b| b["collector"] = json!({"cpu_s": 1e200})),
            "collector.cpu_s"
        );
    }

    #[test]
    fn history_is_optional_and_checked() {
        let mut body = example();
        let minute = 1764132000123u64 / 60_000;
        let spread = json!({"min": 0.5, "avg": 1.0, "max": 2.0});
        body["history"] = json!([
            {"minute": minute - 1, "load_1m": spread, "memory_available_mb": spread, "gpu_free_mb_min": [100]},
            {"minute": minute, "load_1m": spread, "memory_available_mb": spread}
        ]);
        assert_eq!(parse(&body).unwrap().history.len(), 2);
        let mut reordered = body.clone();
        reordered["history"][1]["minute"] = json!(minute - 2);
        assert_eq!(parse(&reordered).unwrap_err().field, "history[1].minute");
        let mut future = body.clone();
        future["history"][1]["minute"] = json!(minute + 5);
        assert_eq!(parse(&future).unwrap_err().field, "history[1].minute");
        let mut inverted = body.clone();
        inverted["history"][0]["load_1m"] = json!({"min": 3.0, "avg": 1.0, "max": 2.0});
        assert_eq!(parse(&inverted).unwrap_err().field, "history[0].load_1m");
        let mut too_many = body;
        too_many["history"] = json!((0..31).map(|i| json!({"minute": minute - 40 + i, "load_1m": spread, "memory_available_mb": spread})).collect::<Vec<_>>());
        assert_eq!(parse(&too_many).unwrap_err().field, "history");
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        let body = example()
            .to_string()
            .replace("\"load_5m\":1.2", "\"load_5m\":1e309");
        assert_eq!(
            Heartbeat::parse(body.as_bytes()).unwrap_err().field,
            "cpu.load_5m"
        );
        assert!(Heartbeat::parse(b"{} trailing").is_err());
        assert!(Heartbeat::parse(b"[]").is_err());
    }
}
