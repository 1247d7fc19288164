//! Results: one record per run and phase, the median of the repetitions per contender, a
//! Markdown table, JSON and a latency-percentile chart (SVG).

use crate::contenders::Kind;
use crate::sys::MachineLoad;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Percentiles kept for the chart and the tables.
pub const PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// `1000 rps`, `5000 rps`, `max`.
    pub name: String,
    pub rate: Option<u32>,
    pub connections: usize,
    pub seconds: f64,
    pub ok: u64,
    pub errors: u64,
    pub unsent: u64,
    pub first_error: Option<String>,
    pub throughput: f64,
    /// (percentile, latency in µs), for [`PERCENTILES`].
    pub latency_us: Vec<(f64, f64)>,
    /// CPU seconds of each proxy process during the phase.
    pub proxy_cpu_s: Vec<(String, f64)>,
    /// Peak RSS (VmHWM) of each proxy process at the end of the phase, KiB.
    pub proxy_peak_rss_kib: Vec<(String, u64)>,
    pub machine: Option<MachineLoadRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineLoadRecord {
    pub other_cpus: f64,
    pub steal_cpus: f64,
    pub idle_cpus: f64,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub disturbed: bool,
}

impl From<MachineLoad> for MachineLoadRecord {
    fn from(m: MachineLoad) -> Self {
        MachineLoadRecord {
            disturbed: m.disturbed(),
            other_cpus: m.other_cpus,
            steal_cpus: m.steal_cpus,
            idle_cpus: m.idle_cpus,
            loadavg_before: m.loadavg_before,
            loadavg_after: m.loadavg_after,
        }
    }
}

impl Phase {
    pub fn latency(&self, percentile: f64) -> f64 {
        self.latency_us
            .iter()
            .find(|(p, _)| (*p - percentile).abs() < 1e-9)
            .map_or(f64::NAN, |(_, v)| *v)
    }

    /// CPU seconds of all proxies per 1,000 answered requests.
    pub fn cpu_per_1k(&self) -> f64 {
        let total: f64 = self.proxy_cpu_s.iter().map(|(_, s)| s).sum();
        total / (self.ok.max(1) as f64 / 1000.0)
    }

    pub fn disturbed(&self) -> bool {
        self.machine.as_ref().is_some_and(|m| m.disturbed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub contender: Kind,
    pub repetition: usize,
    /// 1 for the first try, 2 for a re-run of a disturbed one.
    pub attempt: usize,
    /// Kept for the medians (a disturbed run's re-run replaces it when it was less disturbed).
    pub counted: bool,
    /// RSS of each proxy before any load, KiB.
    pub proxy_idle_rss_kib: Vec<(String, u64)>,
    pub phases: Vec<Phase>,
}

impl Run {
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    pub fn disturbed(&self) -> bool {
        self.phases.iter().any(Phase::disturbed)
    }

    /// Busy CPU of other processes during the run, for choosing between a run and its re-run.
    pub fn other_load(&self) -> f64 {
        self.phases
            .iter()
            .filter_map(|p| p.machine.as_ref())
            .map(|m| m.other_cpus + m.steal_cpus)
            .fold(0.0, f64::max)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub started: String,
    pub machine: String,
    pub command: String,
    pub settings: serde_json::Value,
    pub runs: Vec<Run>,
    pub wall_seconds: f64,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median over counted repetitions of one contender's phase.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub contender: Kind,
    pub phase: String,
    pub runs: usize,
    pub latency_us: Vec<(f64, f64)>,
    pub throughput: f64,
    pub cpu_per_1k_s: f64,
    /// Per proxy: (name, CPU s per 1k requests, peak RSS KiB at the phase's end, idle RSS KiB).
    pub proxies: Vec<(String, f64, f64, f64)>,
    pub errors: u64,
    pub disturbed_runs: usize,
}

impl Summary {
    pub fn latency(&self, percentile: f64) -> f64 {
        self.latency_us
            .iter()
            .find(|(p, _)| (*p - percentile).abs() < 1e-9)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

pub fn summarize(report: &Report, contender: Kind, phase: &str) -> Option<Summary> {
    let runs: Vec<(&Run, &Phase)> = report
        .runs
        .iter()
        .filter(|r| r.contender == contender && r.counted)
        .filter_map(|r| r.phase(phase).map(|p| (r, p)))
        .collect();
    if runs.is_empty() {
        return None;
    }
    let latency_us = PERCENTILES
        .iter()
        .map(|&q| (q, median(runs.iter().map(|(_, p)| p.latency(q)).collect())))
        .collect();
    let names: Vec<String> = runs[0]
        .1
        .proxy_cpu_s
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    let proxies = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let cpu = median(
                runs.iter()
                    .map(|(_, p)| {
                        p.proxy_cpu_s.get(i).map_or(f64::NAN, |(_, s)| *s)
                            / (p.ok.max(1) as f64 / 1000.0)
                    })
                    .collect(),
            );
            let peak = median(
                runs.iter()
                    .map(|(_, p)| {
                        p.proxy_peak_rss_kib
                            .get(i)
                            .map_or(f64::NAN, |(_, k)| *k as f64)
                    })
                    .collect(),
            );
            let idle = median(
                runs.iter()
                    .map(|(r, _)| {
                        r.proxy_idle_rss_kib
                            .get(i)
                            .map_or(f64::NAN, |(_, k)| *k as f64)
                    })
                    .collect(),
            );
            (name.clone(), cpu, peak, idle)
        })
        .collect();
    Some(Summary {
        contender,
        phase: phase.to_string(),
        runs: runs.len(),
        latency_us,
        throughput: median(runs.iter().map(|(_, p)| p.throughput).collect()),
        cpu_per_1k_s: median(runs.iter().map(|(_, p)| p.cpu_per_1k()).collect()),
        proxies,
        errors: runs.iter().map(|(_, p)| p.errors + p.unsent).sum(),
        disturbed_runs: runs.iter().filter(|(_, p)| p.disturbed()).count(),
    })
}

fn us(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b.abs() > 1e-12 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn mib(kib: f64) -> String {
    if kib.is_finite() {
        format!("{:.1}", kib / 1024.0)
    } else {
        "–".into()
    }
}

/// Phase names in run order.
pub fn phase_names(report: &Report) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for run in &report.runs {
        for phase in &run.phases {
            if !names.contains(&phase.name) {
                names.push(phase.name.clone());
            }
        }
    }
    names
}

pub fn contenders(report: &Report) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = Vec::new();
    for run in &report.runs {
        if !kinds.contains(&run.contender) {
            kinds.push(run.contender);
        }
    }
    kinds
}

/// All medians, keyed by phase then contender.
pub fn summaries(report: &Report) -> BTreeMap<String, Vec<Summary>> {
    phase_names(report)
        .into_iter()
        .map(|phase| {
            let list = contenders(report)
                .into_iter()
                .filter_map(|k| summarize(report, k, &phase))
                .collect();
            (phase, list)
        })
        .collect()
}

fn find(list: &[Summary], kind: Kind) -> Option<&Summary> {
    list.iter().find(|s| s.contender == kind)
}

pub fn markdown(report: &Report) -> String {
    let all = summaries(report);
    let max = all.get("max").cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {}. Started {}; {:.0} s in all. Median of {} counted run(s) per contender, \
         interleaved.\n\nCommand: `{}`\n",
        report.machine,
        report.started,
        report.wall_seconds,
        report
            .runs
            .iter()
            .filter(|r| r.counted)
            .map(|r| r.repetition)
            .max()
            .map_or(0, |m| m + 1),
        report.command
    );
    for (phase, list) in &all {
        if phase == "max" {
            continue;
        }
        let direct = find(list, Kind::Direct);
        let added = |s: &Summary, q: f64| direct.map_or(f64::NAN, |d| s.latency(q) - d.latency(q));
        let _ = writeln!(
            out,
            "### {phase}, {} connections, 1 KiB answers (latency from the intended send time)\n",
            report.settings["connections"]
        );
        let _ = writeln!(
            out,
            "| contender | p50 | p90 | p99 | p99.9 | added p50 | added p99 | proxy CPU s / 1k req (A + B) | peak RSS MiB (A / B) | max throughput (closed loop) | errors | disturbed runs |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for s in list {
            let proxies = &s.proxies;
            let cpu = if proxies.is_empty() {
                "–".to_string()
            } else {
                format!(
                    "{:.3} ({})",
                    s.cpu_per_1k_s,
                    proxies
                        .iter()
                        .map(|p| format!("{:.3}", p.1))
                        .collect::<Vec<_>>()
                        .join(" + ")
                )
            };
            let rss = if proxies.is_empty() {
                "–".to_string()
            } else {
                proxies
                    .iter()
                    .map(|p| mib(p.2))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let throughput = find(&max, s.contender)
                .map_or("–".into(), |m| format!("{:.0} req/s", m.throughput));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.contender.name(),
                us(s.latency(50.0)),
                us(s.latency(90.0)),
                us(s.latency(99.0)),
                us(s.latency(99.9)),
                if s.contender == Kind::Direct {
                    "–".into()
                } else {
                    us(added(s, 50.0))
                },
                if s.contender == Kind::Direct {
                    "–".into()
                } else {
                    us(added(s, 99.0))
                },
                cpu,
                rss,
                throughput,
                s.errors,
                s.disturbed_runs,
            );
        }
        let _ = writeln!(out);
        let envoy = find(list, Kind::Envoy);
        let haproxy = find(list, Kind::Haproxy);
        if envoy.is_some() || haproxy.is_some() {
            let _ = writeln!(
                out,
                "Ratios at {phase} (same run; below 1 is better for latency and CPU, above 1 for throughput):\n"
            );
            let _ = writeln!(
                out,
                "| contender | added p50 vs Envoy | added p99 vs Envoy | CPU vs Envoy | throughput vs Envoy | added p50 vs HAProxy | added p99 vs HAProxy | CPU vs HAProxy | throughput vs HAProxy |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
            let thr = |k: Kind| find(&max, k).map_or(f64::NAN, |m| m.throughput);
            for s in list.iter().filter(|s| s.contender != Kind::Direct) {
                let vs = |o: Option<&Summary>| -> [String; 4] {
                    match o {
                        Some(o) => [
                            ratio(added(s, 50.0), added(o, 50.0)),
                            ratio(added(s, 99.0), added(o, 99.0)),
                            ratio(s.cpu_per_1k_s, o.cpu_per_1k_s),
                            ratio(thr(s.contender), thr(o.contender)),
                        ],
                        None => ["–".into(), "–".into(), "–".into(), "–".into()],
                    }
                };
                let [a, b, c, d] = vs(envoy);
                let [e, f, g, h] = vs(haproxy);
                let _ = writeln!(
                    out,
                    "| {} | {a} | {b} | {c} | {d} | {e} | {f} | {g} | {h} |",
                    s.contender.name()
                );
            }
            let _ = writeln!(out);
        }
    }
    if let Some(goals) = goals(report) {
        let _ = writeln!(out, "### Sinew against its goals\n\n{goals}");
    }
    let _ = writeln!(out, "### Machine load during each run\n");
    let _ = writeln!(
        out,
        "| contender | rep | try | counted | phase | other CPUs busy | steal | loadavg before → after |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for run in &report.runs {
        for phase in &run.phases {
            if let Some(m) = &phase.machine {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.2}{} | {:.2} | {} → {} |",
                    run.contender.name(),
                    run.repetition + 1,
                    run.attempt,
                    if run.counted { "yes" } else { "no" },
                    phase.name,
                    m.other_cpus,
                    if m.disturbed { " (disturbed)" } else { "" },
                    m.steal_cpus,
                    m.loadavg_before,
                    m.loadavg_after
                );
            }
        }
    }
    out
}

/// Sinew's goals, checked against the medians at the lowest fixed rate.
pub fn goals(report: &Report) -> Option<String> {
    let all = summaries(report);
    let phase = phase_names(report).into_iter().find(|p| p != "max")?;
    let list = all.get(&phase)?;
    let sinew = find(list, Kind::Sinew)?;
    let direct = find(list, Kind::Direct)?;
    let added = |s: &Summary, q: f64| s.latency(q) - direct.latency(q);
    let mut out = String::new();
    let mut line = |met: bool, text: String| {
        let _ = writeln!(out, "- {} {text}", if met { "met:" } else { "MISSED:" });
    };
    let (a50, a99) = (added(sinew, 50.0), added(sinew, 99.0));
    let noisy = sinew.disturbed_runs + direct.disturbed_runs > 0;
    let caveat = |v: f64| {
        if v < 0.0 {
            " — INCONCLUSIVE: below the direct baseline, the noise exceeds the difference"
        } else if noisy {
            " (runs disturbed by other load: see the machine-load table)"
        } else {
            ""
        }
    };
    line(
        (0.0..=150.0).contains(&a50),
        format!("added p50 at {phase} ≤ 150 µs: {}{}", us(a50), caveat(a50)),
    );
    line(
        (0.0..=500.0).contains(&a99),
        format!("added p99 at {phase} ≤ 500 µs: {}{}", us(a99), caveat(a99)),
    );
    if let Some(envoy) = find(list, Kind::Envoy) {
        let (e50, e99) = (added(envoy, 50.0), added(envoy, 99.0));
        line(
            a50 >= 0.0
                && e50 > 0.0
                && a99 >= 0.0
                && e99 > 0.0
                && a50 <= 0.5 * e50
                && a99 <= 0.5 * e99,
            format!(
                "added latency ≤ 0.5× the Envoy pair's: p50 {} (Envoy {}), p99 {} (Envoy {}){}",
                ratio(a50, e50),
                us(e50),
                ratio(a99, e99),
                us(e99),
                caveat(a50.min(a99).min(e50).min(e99))
            ),
        );
        line(
            sinew.cpu_per_1k_s <= 0.25 * envoy.cpu_per_1k_s,
            format!(
                "proxy CPU per 1,000 requests ≤ 0.25× Envoy's: {:.3} s vs {:.3} s ({})",
                sinew.cpu_per_1k_s,
                envoy.cpu_per_1k_s,
                ratio(sinew.cpu_per_1k_s, envoy.cpu_per_1k_s)
            ),
        );
    }
    let idle = sinew.proxies.iter().map(|p| p.3).fold(0.0, f64::max);
    let peak = sinew.proxies.iter().map(|p| p.2).fold(0.0, f64::max);
    line(
        idle <= 10.0 * 1024.0,
        format!(
            "sidecar RSS idle ≤ 10 MB: {} MiB (the larger of the two)",
            mib(idle)
        ),
    );
    line(
        peak <= 25.0 * 1024.0,
        format!(
            "sidecar peak RSS under the {phase} run ≤ 25 MB: {} MiB",
            mib(peak)
        ),
    );
    if let Some(max) = all.get("max")
        && let (Some(s), Some(h)) = (find(max, Kind::Sinew), find(max, Kind::Haproxy))
    {
        line(
            s.throughput >= h.throughput,
            format!(
                "one sidecar thread's max throughput ≥ one HAProxy thread's: {:.0} vs {:.0} req/s",
                s.throughput, h.throughput
            ),
        );
    }
    Some(out)
}

/// A latency-by-percentile chart of one phase's medians, one line per contender.
pub fn chart(report: &Report, phase: &str, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let all = summaries(report);
    let Some(list) = all.get(phase) else {
        return Ok(());
    };
    // x: "nines" of the percentile (50% = 0.3, 90% = 1, 99% = 2, 99.9% = 3, 99.99% = 4).
    let nines = |q: f64| -(1.0 - q / 100.0).log10();
    let points = |s: &Summary| -> Vec<(f64, f64)> {
        s.latency_us
            .iter()
            .filter(|(q, v)| *q < 100.0 && v.is_finite())
            .map(|(q, v)| (nines(*q), v.max(1.0)))
            .collect()
    };
    let top = list
        .iter()
        .flat_map(points)
        .map(|(_, v)| v)
        .fold(10.0, f64::max)
        * 1.5;
    let bottom = list
        .iter()
        .flat_map(points)
        .map(|(_, v)| v)
        .fold(f64::INFINITY, f64::min)
        .min(top / 10.0)
        / 1.5;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency by percentile at {phase} (median of runs)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..4.2f64, (bottom.max(1.0)..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, log)")
        .x_labels(9)
        .x_label_formatter(&|x| {
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{q:.2}%")
        })
        .draw()?;
    let colors = [&BLACK, &RED, &BLUE, &GREEN, &MAGENTA, &CYAN];
    for (i, s) in list.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(points(s), color.stroke_width(2)))?
            .label(s.contender.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points(s)
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
