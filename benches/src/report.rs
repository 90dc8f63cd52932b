//! `glm-bench report`: ours and the peers' run records (and the demo model's quality) merged into one
//! JSON document with the device, driver, date and commit; the goals judged from the numbers;
//! a markdown table of it all.

use std::fmt::Write as _;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::quality::QualityRecord;
use crate::record::{Memory, RunRecord, Stats, TRANSFORMERS};

/// Everything one benchmark run produced (`benches/results/e2e-<date>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub device: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub git_commit: Option<String>,
    pub runs: Vec<RunRecord>,
    #[serde(default)]
    pub quality: Option<QualityRecord>,
    pub goals: Vec<Goal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Met,
    NotMet,
    NotMeasured,
}

impl Status {
    fn text(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::NotMet => "**not met**",
            Status::NotMeasured => "not measured",
        }
    }
}

/// One of issue 9's goals, judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub status: Status,
    /// Why it was met or not, from the numbers.
    pub reason: String,
}

/// The target of the memory goal, in bytes (7 GB, decimal).
pub const MEMORY_GOAL_BYTES: u64 = 7_000_000_000;
/// The context the memory goal is stated at.
pub const MEMORY_GOAL_CONTEXT: usize = 4096;

impl Report {
    /// Merges `runs` (one device) with the quality figures and judges the goals.
    pub fn new(
        date: String,
        driver: Option<String>,
        git_commit: Option<String>,
        runs: Vec<RunRecord>,
        quality: Option<QualityRecord>,
    ) -> Result<Self> {
        let Some(first) = runs.first() else {
            bail!(
                "no run records to report: pass the JSON files of glm-bench run and peers.py peer"
            );
        };
        let device = first.device.clone();
        if let Some(other) = runs.iter().find(|r| r.device != device) {
            bail!(
                "the runs were measured on different devices ({device} and {}): a comparison needs one \
                 device in one run",
                other.device
            );
        }
        for (i, a) in runs.iter().enumerate() {
            if runs[..i]
                .iter()
                .any(|b| (&b.runtime, &b.variant) == (&a.runtime, &a.variant))
            {
                bail!(
                    "two runs of {} {}: pass each runtime and variant once",
                    a.runtime,
                    a.variant
                );
            }
        }
        // Dense, then NF4, then NF4 with the minimum-memory options; ours before the peers' in each.
        let mut runs = runs;
        runs.sort_by_key(|r| (r.is_nf4(), r.is_min_memory(), !r.is_ours()));
        let goals = judge(&runs);
        Ok(Self {
            date,
            device,
            driver,
            git_commit,
            runs,
            quality,
            goals,
        })
    }

    /// The report as markdown: settings, one row per run, the goals, the quality table.
    pub fn markdown(&self, chart: Option<&str>) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# End-to-end benchmark: glm-run against its roofline and transformers\n"
        );
        let driver = self
            .driver
            .as_deref()
            .map_or(String::new(), |d| format!(", driver {d}"));
        let commit = self
            .git_commit
            .as_deref()
            .map_or(String::new(), |c| format!(", commit {c}"));
        let _ = writeln!(md, "{}{driver}, {}{commit}.", self.device, self.date);
        let models: Vec<&str> = dedup(self.runs.iter().map(|r| r.model.as_str()));
        let _ = writeln!(
            md,
            "Model: {}. Greedy, batch 1, the same prompt ids for every runtime; {}. Prefill: \
             prompt tokens ÷ time to first token (one new token). Decode: new tokens after the first ÷ the \
             time from the first to the last. Memory: the driver's used memory, peak above the usage \
             before the load (CUDA context excluded); GB = 10⁹ bytes. Roofline: weight bytes read per \
             token ÷ the device-to-device copy bandwidth measured in the same run. Greedy tokens = transformers: \
             leading decode tokens equal to transformers' at the same precision (random weights give \
             near-flat logits, so paths part after a few tokens; a mismatch from the first token is worth \
             a look).\n",
            models.join(", "),
            self.repetitions()
        );
        md.push_str(&self.runs_table());
        md.push_str(&self.decode_variants_table());
        md.push_str("\n## Goals (issue 9)\n\n");
        let rows = self.goals.iter().map(|g| {
            vec![
                g.goal.clone(),
                g.measured.clone(),
                g.status.text().into(),
                g.reason.clone(),
            ]
        });
        md.push_str(&table(&["goal", "measured", "status", "why"], rows));
        if let Some(q) = &self.quality {
            md.push('\n');
            md.push_str(&quality_table(q));
        }
        if let Some(chart) = chart {
            let _ = writeln!(md, "\n![decode tokens/s and peak GPU memory]({chart})");
        }
        md
    }

    /// "1 warm-up + 3 measured runs each, median (min–max)", or the settings of each run if they differ.
    fn repetitions(&self) -> String {
        let settings = dedup(self.runs.iter().map(|r| {
            format!(
                "{} warm-up + {} measured runs, decode {} new tokens after a {}-token prompt",
                r.warmup, r.reps, r.decode.new_tokens, r.decode.prompt_tokens
            )
        }));
        format!("{}; median (min–max)", settings.join(" / "))
    }

    /// For one of our runs: how many leading greedy tokens equal those of the transformers run of the
    /// same precision class (dense with dense, NF4 with NF4), out of how many.
    fn same_tokens_as_peer(&self, run: &RunRecord) -> Option<(usize, usize)> {
        if !run.is_ours() {
            return None;
        }
        let peer = self
            .runs
            .iter()
            .find(|p| p.runtime == TRANSFORMERS && p.is_nf4() == run.is_nf4())?;
        let (ours, theirs) = (&run.decode.tokens, &peer.decode.tokens);
        if ours.is_empty() || run.decode.prompt_tokens != peer.decode.prompt_tokens {
            return None;
        }
        let same = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
        Some((same, ours.len().min(theirs.len())))
    }

    /// Our decode step's modes and batches (issue 10), where measured: rate, time per step and share of the
    /// roofline (a batch reads the weights once per step, so its bound is the batch-1 bound × the batch).
    fn decode_variants_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .runs
            .iter()
            .filter(|r| r.is_ours())
            .flat_map(|r| {
                let main = crate::record::DecodeVariant {
                    mode: "graph".into(),
                    batch: 1,
                    tok_s: r.decode.tok_s.clone(),
                    same_tokens: true,
                };
                let variants: Vec<_> = if r.decode_variants.is_empty() {
                    Vec::new()
                } else {
                    std::iter::once(main)
                        .chain(r.decode_variants.iter().cloned())
                        .collect()
                };
                variants.into_iter().map(move |v| {
                    let step_ms = 1e3 * v.batch as f64 / v.tok_s.median;
                    let of_roofline = r.roofline.as_ref().map_or("–".into(), |f| {
                        format!(
                            "{:.0}%",
                            100.0 * v.tok_s.median / (f.bound_tok_s * v.batch as f64)
                        )
                    });
                    vec![
                        r.variant.clone(),
                        v.mode.clone(),
                        v.batch.to_string(),
                        stat(&v.tok_s, 1.0, 1),
                        format!("{step_ms:.2}"),
                        of_roofline,
                        if v.same_tokens { "yes" } else { "NO" }.into(),
                    ]
                })
            })
            .collect();
        if rows.is_empty() {
            return String::new();
        }
        format!(
            "\n## Decode step: plain (op by op), fused kernels, fused as a CUDA graph; batches (issue 10)\n\n\
             Same tokens: batch 1, the greedy tokens equal the graph's (fused and graph launch the same kernels \
             and are bit-identical; plain accumulates in another order, so on random weights' near-flat logits \
             it parts at a near-tie: the GPU tests hold all three to the same tokens on trained fixtures); a \
             batch, every row (the same prompt) chose the same tokens. A batch reads the weights once per \
             step: its roofline is the batch-1 bound × the batch.\n\n{}",
            table(
                &["glm-run", "mode", "batch", "tok/s", "ms/step", "of roofline", "same tokens"],
                rows.into_iter()
            )
        )
    }

    fn runs_table(&self) -> String {
        let mut lengths: Vec<usize> = self
            .runs
            .iter()
            .flat_map(|r| r.prefill.iter().map(|p| p.prompt_tokens))
            .collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut header: Vec<String> = vec!["runtime".into(), "load s".into(), "TTFT ms".into()];
        header.extend(lengths.iter().map(|n| format!("prefill tok/s @{n}")));
        header.extend(
            [
                "decode tok/s",
                "roofline tok/s",
                "of roofline",
                "peak GPU GB",
                "after load GB",
                "4k-context peak GB",
                "greedy tokens = transformers",
            ]
            .map(String::from),
        );
        let rows = self.runs.iter().map(|r| {
            let ttft = r.prefill.first().map_or("–".into(), |p| {
                format!("{} @{}", stat(&p.ttft_s, 1e3, 1), p.prompt_tokens)
            });
            let mut cells = vec![r.label(), format!("{:.2}", r.load_s), ttft];
            cells.extend(lengths.iter().map(|n| {
                r.prefill
                    .iter()
                    .find(|p| p.prompt_tokens == *n)
                    .map_or("–".into(), |p| stat(&p.tok_s, 1.0, 0))
            }));
            let memory = r.memory.as_ref();
            let roofline = r.roofline.as_ref();
            cells.extend([
                stat(&r.decode.tok_s, 1.0, 1),
                roofline.map_or("–".into(), |f| format!("{:.0}", f.bound_tok_s)),
                roofline.map_or("–".into(), |f| {
                    format!("{:.0}%", f.achieved_fraction * 100.0)
                }),
                opt_gb(memory.and_then(|m| m.driver_peak_bytes)),
                opt_gb(memory.and_then(|m| m.driver_after_load_bytes)),
                memory
                    .and_then(|m| {
                        let peak = m.driver_peak_full_context_bytes?;
                        Some(format!("{} @{}", gb(peak), m.full_context_tokens?))
                    })
                    .unwrap_or_else(|| "–".into()),
                self.same_tokens_as_peer(r)
                    .map_or("–".into(), |(same, n)| format!("{same}/{n}")),
            ]);
            cells
        });
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut md = table(&header, rows);
        let bandwidths: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|r| Some(r.roofline.as_ref()?.copy_bandwidth_bytes_per_s.median / 1e9))
            .collect();
        if let (Some(lo), Some(hi)) = (
            bandwidths.iter().copied().reduce(f64::min),
            bandwidths.iter().copied().reduce(f64::max),
        ) {
            let _ = writeln!(
                md,
                "\nCopy bandwidth (device to device, read + write; the median of each glm-run process): \
                 {lo:.0}–{hi:.0} GB/s."
            );
        }
        md
    }
}

/// The UTC date of a Unix time as YYYY-MM-DD (days to civil date, proleptic Gregorian calendar).
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `median (min–max)` of `s` scaled by `scale`, with `digits` decimals.
fn stat(s: &Stats, scale: f64, digits: usize) -> String {
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        s.median * scale,
        s.min * scale,
        s.max * scale,
        d = digits
    )
}

fn gb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / 1e9)
}

/// Bytes in GB, or MB below 0.1 GB (small models).
fn bytes_text(bytes: u64) -> String {
    if bytes < 100_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{} GB", gb(bytes))
    }
}

fn opt_gb(bytes: Option<u64>) -> String {
    bytes.map_or("–".into(), gb)
}

fn dedup<T: PartialEq>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

fn quality_table(q: &QualityRecord) -> String {
    let mut md = String::new();
    let subset = q
        .subset_windows
        .map_or(String::new(), |n| format!(", first {n} windows"));
    let _ = writeln!(
        md,
        "## Quality beside speed: {} on {} ({}, held-out text, windows of {} tokens, {} predictions)\n",
        q.model, q.device, q.text, q.window, q.predictions
    );
    let pct = |x: Option<f64>| x.map_or("–".into(), |v| format!("{:.2}%", v * 100.0));
    let rows = q.variants.iter().map(|v| {
        vec![
            v.name.clone(),
            format!("{:.3}", v.perplexity),
            v.transformers_perplexity
                .map_or("–".into(), |p| format!("{p:.3}")),
            pct(Some(v.top1_agreement_with_f32)),
            pct(v.transformers_top1_agreement_with_f32_subset),
            pct(v.top1_agreement_with_transformers_subset),
        ]
    });
    let header = [
        "precision".to_string(),
        "perplexity glm-run".into(),
        "perplexity transformers".into(),
        "top-1 = f32, glm-run".into(),
        format!("top-1 = f32, transformers{subset}"),
        format!("top-1 = transformers{subset}"),
    ];
    md.push_str(&table(&header.each_ref().map(String::as_str), rows));
    md
}

/// A markdown table: the header, the separator, one line per row.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let line = |cells: &[&str]| format!("| {} |\n", cells.join(" | "));
    let mut md = line(header);
    md.push_str(&line(&vec!["---"; header.len()]));
    for row in rows {
        md.push_str(&line(&row.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    md
}

/// The runs the goals compare.
struct Runs<'a> {
    nf4: Option<&'a RunRecord>,
    dense: Option<&'a RunRecord>,
    min: Option<&'a RunRecord>,
    peer_nf4: Option<&'a RunRecord>,
    peer_dense: Option<&'a RunRecord>,
}

impl<'a> Runs<'a> {
    fn find(runs: &'a [RunRecord]) -> Self {
        let ours = |f: &dyn Fn(&RunRecord) -> bool| runs.iter().find(|r| r.is_ours() && f(r));
        let peer = |f: &dyn Fn(&RunRecord) -> bool| {
            runs.iter().find(|r| r.runtime == TRANSFORMERS && f(r))
        };
        Self {
            nf4: ours(&|r| r.variant == "nf4-dq"),
            dense: ours(&|r| !r.is_nf4()),
            min: ours(&|r| r.variant == "nf4-dq-min"),
            peer_nf4: peer(&|r| r.variant == "nf4-dq"),
            peer_dense: peer(&|r| !r.is_nf4()),
        }
    }
}

fn decode(r: &RunRecord) -> f64 {
    r.decode.tok_s.median
}

fn missing(goal: &str, what: &str) -> Goal {
    Goal {
        goal: goal.into(),
        measured: "–".into(),
        status: Status::NotMeasured,
        reason: format!("not in this benchmark: {what}"),
    }
}

fn status(met: bool) -> Status {
    if met {
        Status::Met
    } else {
        Status::NotMet
    }
}

/// Judges issue 9's goals from the runs.
pub fn judge(runs: &[RunRecord]) -> Vec<Goal> {
    let r = Runs::find(runs);
    vec![
        nf4_over_dense(&r),
        nf4_roofline(&r),
        nf4_over_peer(r.nf4, r.peer_nf4, 5.0, "transformers+bitsandbytes NF4"),
        nf4_over_peer(r.nf4, r.peer_dense, 1.5, "transformers FP16/BF16"),
        memory_goal(&r),
    ]
}

fn nf4_over_dense(r: &Runs) -> Goal {
    let goal = "NF4 decode ≥ 3× our FP16/BF16 decode";
    let (Some(nf4), Some(dense)) = (r.nf4, r.dense) else {
        return missing(goal, "a glm-run NF4 (nf4-dq) and a dense run");
    };
    let ratio = decode(nf4) / decode(dense);
    let reason = match (&nf4.roofline, &dense.roofline) {
        (Some(a), Some(b)) => format!(
            "weights read per token: {} dense vs {} NF4, so bytes alone allow {:.2}×; NF4 runs at \
             {:.0}% of its roofline, dense at {:.0}%",
            bytes_text(b.weight_bytes_per_token),
            bytes_text(a.weight_bytes_per_token),
            b.weight_bytes_per_token as f64 / a.weight_bytes_per_token as f64,
            a.achieved_fraction * 100.0,
            b.achieved_fraction * 100.0
        ),
        _ => "no roofline in these runs to explain the ratio".into(),
    };
    Goal {
        goal: goal.into(),
        measured: format!(
            "{ratio:.2}× ({:.1} vs {:.1} tok/s)",
            decode(nf4),
            decode(dense)
        ),
        status: status(ratio >= 3.0),
        reason,
    }
}

fn nf4_roofline(r: &Runs) -> Goal {
    let goal = "NF4 decode ≥ 75% of its roofline";
    let Some((nf4, roof)) = r.nf4.and_then(|n| n.roofline.as_ref().map(|f| (n, f))) else {
        return missing(goal, "a glm-run NF4 (nf4-dq) run with a roofline");
    };
    let step_ms = 1e3 / decode(nf4);
    let bound_ms = 1e3 / roof.bound_tok_s;
    let reason = if roof.achieved_fraction >= 0.75 {
        format!("{step_ms:.2} ms per token against {bound_ms:.2} ms of weight reads")
    } else {
        format!(
            "{step_ms:.2} ms per token against {bound_ms:.2} ms of weight reads: {:.2} ms of each token \
             is not weight traffic at copy bandwidth (the GPU busy on GEMVs below copy bandwidth and on \
             small kernels, and idle between kernels: benches/results/decode-overhead.md splits it)",
            step_ms - bound_ms
        )
    };
    Goal {
        goal: goal.into(),
        measured: format!(
            "{:.0}% ({:.1} of {:.1} tok/s; {} per token at {:.0} GB/s)",
            roof.achieved_fraction * 100.0,
            decode(nf4),
            roof.bound_tok_s,
            bytes_text(roof.weight_bytes_per_token),
            roof.copy_bandwidth_bytes_per_s.median / 1e9
        ),
        status: status(roof.achieved_fraction >= 0.75),
        reason,
    }
}

fn nf4_over_peer(
    nf4: Option<&RunRecord>,
    peer: Option<&RunRecord>,
    target: f64,
    name: &str,
) -> Goal {
    let goal = format!("NF4 decode ≥ {target}× {name} decode");
    let (Some(nf4), Some(peer)) = (nf4, peer) else {
        return missing(&goal, &format!("a glm-run NF4 (nf4-dq) and a {name} run"));
    };
    let ratio = decode(nf4) / decode(peer);
    let needed = target * decode(peer);
    let reason = if ratio >= target {
        format!("{name}: {:.1} ms per token", 1e3 / decode(peer))
    } else {
        let bound = nf4.roofline.as_ref().map_or(String::new(), |f| {
            format!(" (our roofline: {:.0} tok/s)", f.bound_tok_s)
        });
        format!(
            "needs {needed:.1} tok/s{bound}; we decode at {:.1}",
            decode(nf4)
        )
    };
    Goal {
        goal,
        measured: format!(
            "{ratio:.2}× ({:.1} vs {:.1} tok/s)",
            decode(nf4),
            decode(peer)
        ),
        status: status(ratio >= target),
        reason,
    }
}

/// The driver's peak once a prompt filled a context of at least the goal's, with the run's memory.
fn full_context(run: Option<&RunRecord>) -> Option<(u64, &Memory)> {
    let m = run?.memory.as_ref()?;
    let peak = m.driver_peak_full_context_bytes?;
    (m.full_context_tokens? >= MEMORY_GOAL_CONTEXT).then_some((peak, m))
}

fn memory_goal(r: &Runs) -> Goal {
    let goal = format!(
        "NF4 peak GPU memory at {}k context ≤ {} GB with the minimum-memory options",
        MEMORY_GOAL_CONTEXT / 1024,
        MEMORY_GOAL_BYTES / 1_000_000_000
    );
    let Some((peak, m)) = full_context(r.min) else {
        return missing(
            &goal,
            "a glm-run nf4-dq-min run with the driver's peak at a full 4096-token context (glm-bench \
             run --quant 4bit --min-memory --context 4096 --full-context, on CUDA)",
        );
    };
    let default = full_context(r.nf4).map_or("no figure".into(), |(p, _)| format!("{} GB", gb(p)));
    let after_load = opt_gb(m.driver_after_load_bytes);
    Goal {
        goal,
        measured: format!("{} GB (default options: {default})", gb(peak)),
        status: status(peak <= MEMORY_GOAL_BYTES),
        reason: format!(
            "{after_load} GB after the load; a prefill filling the context raises it to {} GB{}",
            gb(peak),
            m.planned_bytes
                .map_or(String::new(), |p| format!(" (planned: {} GB)", gb(p)))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Decode, Prefill, Roofline, GLM_RUN};

    fn stats(x: f64) -> Stats {
        Stats::new(vec![x * 0.9, x, x * 1.1]).unwrap()
    }

    fn run(runtime: &str, variant: &str, decode_tok_s: f64) -> RunRecord {
        let ours = runtime == GLM_RUN;
        let bytes_per_token = if variant.starts_with("nf4") {
            6_000_000_000
        } else {
            18_000_000_000
        };
        RunRecord {
            runtime: runtime.into(),
            variant: variant.into(),
            dtype: "bf16".into(),
            device: "NVIDIA H100 80GB HBM3".into(),
            model: "/tmp/glm4-9b".into(),
            versions: Default::default(),
            warmup: 1,
            reps: 3,
            load_s: 10.0,
            prefill: vec![Prefill {
                prompt_tokens: 128,
                ttft_s: stats(0.05),
                tok_s: stats(2560.0),
            }],
            decode: Decode {
                prompt_tokens: 128,
                new_tokens: 32,
                batch: 1,
                tok_s: stats(decode_tok_s),
                // NF4 parts from transformers at the fourth token, dense at the first.
                tokens: match (ours, variant.starts_with("nf4")) {
                    (true, true) => vec![1, 2, 3, 9],
                    (true, false) => vec![5, 2, 3, 4],
                    _ => vec![1, 2, 3, 4],
                },
            },
            decode_variants: Vec::new(),
            memory: Some(Memory {
                driver_peak_bytes: Some(6_500_000_000),
                driver_after_load_bytes: Some(6_000_000_000),
                driver_peak_full_context_bytes: variant.starts_with("nf4").then_some(6_800_000_000),
                full_context_tokens: variant.starts_with("nf4").then_some(4096),
                ..Memory::default()
            }),
            roofline: ours
                .then(|| Roofline::new(bytes_per_token, stats(3.0e12), decode_tok_s).unwrap()),
            context_len: Some(4096),
            notes: vec![],
        }
    }

    fn all_runs(nf4: f64, min_peak: u64) -> Vec<RunRecord> {
        let mut min = run(GLM_RUN, "nf4-dq-min", nf4);
        min.memory.as_mut().unwrap().driver_peak_full_context_bytes = Some(min_peak);
        vec![
            run(GLM_RUN, "bf16", 150.0),
            run(GLM_RUN, "nf4-dq", nf4),
            min,
            run(TRANSFORMERS, "bf16", 11.0),
            run(TRANSFORMERS, "nf4-dq", 15.0),
        ]
    }

    #[test]
    fn goals_are_met_when_the_numbers_clear_them() {
        // 460 tok/s: 3.07× dense, 92% of 500 tok/s, 30.7× bnb, 41.8× transformers bf16.
        let goals = judge(&all_runs(460.0, 6_900_000_000));
        let statuses: Vec<Status> = goals.iter().map(|g| g.status).collect();
        assert_eq!(statuses, vec![Status::Met; 5], "{goals:#?}");
        assert!(
            goals[0].measured.starts_with("3.07×"),
            "{}",
            goals[0].measured
        );
        assert!(
            goals[1].measured.starts_with("92%"),
            "{}",
            goals[1].measured
        );
        assert!(
            goals[4]
                .measured
                .contains("6.90 GB (default options: 6.80 GB)"),
            "{}",
            goals[4].measured
        );
    }

    #[test]
    fn goals_missed_say_so_with_the_numbers_behind() {
        // 300 tok/s: 2× dense, 60% of the roofline; 7.2 GB at 4k context.
        let goals = judge(&all_runs(300.0, 7_200_000_000));
        assert_eq!(goals[0].status, Status::NotMet);
        assert!(
            goals[0].reason.contains("bytes alone allow 3.00×"),
            "{}",
            goals[0].reason
        );
        assert_eq!(goals[1].status, Status::NotMet);
        assert!(
            goals[1]
                .reason
                .contains("3.33 ms per token against 2.00 ms"),
            "{}",
            goals[1].reason
        );
        assert_eq!(goals[2].status, Status::Met);
        assert_eq!(goals[4].status, Status::NotMet);
        // Exactly at a target counts as met.
        assert_eq!(
            judge(&all_runs(450.0, MEMORY_GOAL_BYTES))[0].status,
            Status::Met
        );
        assert_eq!(
            judge(&all_runs(450.0, MEMORY_GOAL_BYTES))[4].status,
            Status::Met
        );
    }

    #[test]
    fn missing_runs_are_not_measured_not_passed() {
        let only_peers = vec![
            run(TRANSFORMERS, "bf16", 11.0),
            run(TRANSFORMERS, "nf4-dq", 15.0),
        ];
        for goal in judge(&only_peers) {
            assert_eq!(goal.status, Status::NotMeasured, "{goal:?}");
            assert!(
                goal.reason.starts_with("not in this benchmark: "),
                "{}",
                goal.reason
            );
        }
        let mut runs = all_runs(460.0, 6_000_000_000);
        runs[2].memory.as_mut().unwrap().full_context_tokens = Some(2048);
        assert_eq!(
            judge(&runs)[4].status,
            Status::NotMeasured,
            "a 2k context is not the 4k goal"
        );
    }

    #[test]
    fn a_report_needs_runs_from_one_device_each_once() {
        assert!(Report::new("d".into(), None, None, vec![], None).is_err());
        let mut runs = all_runs(460.0, 6_000_000_000);
        runs[3].device = "NVIDIA H200".into();
        let err = Report::new("d".into(), None, None, runs, None).unwrap_err();
        assert!(err.to_string().contains("different devices"), "{err}");
        let mut twice = all_runs(460.0, 6_000_000_000);
        twice.push(twice[1].clone());
        let err = Report::new("d".into(), None, None, twice, None).unwrap_err();
        assert!(
            err.to_string().contains("two runs of glm-run nf4-dq"),
            "{err}"
        );
    }

    #[test]
    fn markdown_has_a_row_per_run_and_per_goal() {
        let report = Report::new(
            "2026-11-25".into(),
            Some("580.159.04".into()),
            Some("abc1234".into()),
            all_runs(300.0, 6_500_000_000),
            None,
        )
        .unwrap();
        let md = report.markdown(Some("e2e.svg"));
        assert!(
            md.contains("NVIDIA H100 80GB HBM3, driver 580.159.04, 2026-11-25, commit abc1234.")
        );
        let rows = |prefix: &str| md.lines().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(rows("| glm-run "), 3);
        assert_eq!(rows("| transformers"), 2);
        assert!(
            md.contains("| transformers+bnb NF4 | 10.00 | 50.0 (45.0–55.0) @128 |"),
            "{md}"
        );
        let order: Vec<&str> = md
            .lines()
            .filter_map(|l| l.strip_prefix("| ")?.split(" | ").next())
            .collect();
        assert_eq!(
            &order[2..7],
            [
                "glm-run BF16",
                "transformers BF16",
                "glm-run NF4",
                "transformers+bnb NF4",
                "glm-run NF4 min-mem"
            ],
            "dense, NF4, minimum memory; ours first"
        );
        assert!(
            md.contains("| 300.0 (270.0–330.0) | 500 | 60% | 6.50 | 6.00 | 6.80 @4096 |"),
            "{md}"
        );
        assert_eq!(rows("| NF4 decode"), 4);
        assert!(md.contains("| **not met** |"));
        assert!(md.contains(
            "1 warm-up + 3 measured runs, decode 32 new tokens after a 128-token prompt"
        ));
        assert!(
            md.contains("the median of each glm-run process): 3000–3000 GB/s."),
            "{md}"
        );
        assert!(md.ends_with("![decode tokens/s and peak GPU memory](e2e.svg)\n"));
        // Every table row has as many cells as its header.
        for table in md.split("\n\n").filter(|t| t.starts_with("| ")) {
            let cells: Vec<usize> = table.lines().map(|l| l.matches(" |").count()).collect();
            assert!(cells.iter().all(|&c| c == cells[0]), "{table}");
        }
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_795_651_199), "2026-11-25");
        assert_eq!(utc_date(1_795_651_200), "2026-11-26");
    }

    #[test]
    fn the_quality_table_puts_transformers_beside_us() {
        let variant = |name: &str, ppl: f64, theirs: Option<f64>| crate::quality::QualityVariant {
            name: name.into(),
            loss: ppl.ln(),
            perplexity: ppl,
            top1_agreement_with_f32: 0.91139,
            transformers_loss: theirs.map(f64::ln),
            transformers_perplexity: theirs,
            transformers_top1_agreement_with_f32_subset: theirs.map(|_| 0.9055),
            top1_agreement_with_transformers_subset: None,
        };
        let quality = QualityRecord {
            model: "models/demo".into(),
            text: "models/demo/heldout.txt".into(),
            device: "cpu".into(),
            window: 512,
            predictions: 32256,
            subset_windows: Some(16),
            variants: vec![
                variant("nf4", 46.0495, Some(46.0495)),
                variant("x", 1.0, None),
            ],
        };
        let md = quality_table(&quality);
        assert!(
            md.contains("| top-1 = f32, transformers, first 16 windows |"),
            "{md}"
        );
        assert!(
            md.contains("| nf4 | 46.050 | 46.050 | 91.14% | 90.55% | – |"),
            "{md}"
        );
        assert!(md.contains("| x | 1.000 | – | 91.14% | – | – |"), "{md}");
        let report = Report::new("d".into(), None, None, all_runs(1.0, 1), Some(quality)).unwrap();
        assert!(report.markdown(None).contains(&md));
    }

    #[test]
    fn reports_round_trip_through_json() {
        let report = Report::new("d".into(), None, None, all_runs(460.0, 1), None).unwrap();
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains("\"status\":\"not_met\"") || text.contains("\"status\":\"met\""));
        // Floats may move in their last bit through JSON; everything else comes back as it was.
        let again: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(again.goals, report.goals);
        assert_eq!(
            (&again.date, &again.device, again.runs.len()),
            (&report.date, &report.device, 5)
        );
        let labels = |r: &Report| r.runs.iter().map(RunRecord::label).collect::<Vec<_>>();
        assert_eq!(labels(&again), labels(&report));
    }
}
