//! What the machine and each process did: CPU time and peak memory of a process from /proc,
//! the machine's load average and per-CPU busy, idle and steal time (to tell a disturbed run).

use std::time::Instant;

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks; 0 when it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let get = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

pub fn own_pid() -> u32 {
    std::process::id()
}

/// VmHWM (peak RSS) in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    sinew_e2e::proc_status_kib(pid, "VmHWM:")
}

/// VmRSS in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    sinew_e2e::proc_status_kib(pid, "VmRSS:")
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One CPU's counters from /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub idle: u64,
    pub steal: u64,
}

/// Every CPU's line of /proc/stat (`cpu0`, `cpu1`, ...).
pub fn cpu_times() -> Vec<CpuTimes> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal
            CpuTimes {
                busy: at(0) + at(1) + at(2) + at(5) + at(6),
                idle: at(3) + at(4),
                steal: at(7),
            }
        })
        .collect()
}

/// A point to measure from: the machine's CPUs and the CPU time of the processes we know.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: Instant,
    pub cpus: Vec<CpuTimes>,
    /// CPU ticks of each process we watch (ours: the bench itself, proxies, app, control).
    pub ours: Vec<u64>,
    pub loadavg: String,
}

impl Mark {
    pub fn take(pids: &[u32]) -> Mark {
        Mark {
            at: Instant::now(),
            cpus: cpu_times(),
            ours: pids.iter().map(|&p| cpu_ticks(p)).collect(),
            loadavg: loadavg(),
        }
    }
}

/// The machine's load between two marks, besides the processes the bench started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineLoad {
    /// Busy CPU not accounted to our processes, in CPUs (0.5 = half a core on average).
    pub other_cpus: f64,
    /// Steal time, in CPUs.
    pub steal_cpus: f64,
    /// Idle, in CPUs.
    pub idle_cpus: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

impl MachineLoad {
    pub fn between(a: &Mark, b: &Mark, ticks_per_second: f64) -> MachineLoad {
        let secs = (b.at - a.at).as_secs_f64().max(1e-3);
        let sum = |f: fn(&CpuTimes) -> u64, m: &Mark| -> u64 { m.cpus.iter().map(f).sum() };
        let delta = |f: fn(&CpuTimes) -> u64| {
            sum(f, b).saturating_sub(sum(f, a)) as f64 / ticks_per_second / secs
        };
        let ours: u64 = b
            .ours
            .iter()
            .zip(&a.ours)
            .map(|(x, y)| x.saturating_sub(*y))
            .sum();
        let ours = ours as f64 / ticks_per_second / secs;
        MachineLoad {
            other_cpus: (delta(|c| c.busy) - ours).max(0.0),
            steal_cpus: delta(|c| c.steal),
            idle_cpus: delta(|c| c.idle),
            loadavg_before: a.loadavg.clone(),
            loadavg_after: b.loadavg.clone(),
        }
    }

    /// More than a quarter of a core busy with something else, or measurable steal.
    pub fn disturbed(&self) -> bool {
        self.other_cpus > 0.25 || self.steal_cpus > 0.05
    }
}

/// Pins the calling process (every thread it has now; threads started later inherit it) to
/// one CPU, with `taskset`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    pin(own_pid(), cpu)
}

/// Pins every thread of a running process to one CPU.
pub fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "taskset -a -c -p {cpu} {pid} failed");
    Ok(())
}

/// How many CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
