//! The JSON schema of one measured run, shared by `glm-bench run` and `benches/peers.py peer`, so that the
//! report reads ours and the peers' alike.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Runtime name of our runs (`runtime` field); the peers write "transformers".
pub const GLM_RUN: &str = "glm-run";
pub const TRANSFORMERS: &str = "transformers";

/// Median, extremes and the samples of one repeated measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// The statistics of `samples`; fails on none or on a non-finite one (a timing that went wrong).
    pub fn new(samples: Vec<f64>) -> Result<Self> {
        if samples.is_empty() {
            bail!("no samples to summarize: ask for at least one repetition");
        }
        if let Some(bad) = samples.iter().find(|x| !x.is_finite()) {
            bail!("a measurement is not a finite number ({bad}): a timing was zero or failed");
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Ok(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples,
        })
    }

    /// Half the max-min range relative to the median: the spread shown beside a median.
    pub fn relative_spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median
        }
    }
}

/// Time to first token and prefill rate for one prompt length (one new token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prefill {
    pub prompt_tokens: usize,
    pub ttft_s: Stats,
    pub tok_s: Stats,
}

/// Decode rate: new tokens after the first, over the time from the first to the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decode {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub batch: usize,
    pub tok_s: Stats,
    /// The greedy tokens of the last repetition (to compare runtimes' outputs).
    pub tokens: Vec<u32>,
}

/// Decode of one mode of the decode step (plain op by op, fused kernels, fused as a CUDA graph), batch 1,
/// or of a batch of sequences in the default mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeVariant {
    /// "plain", "fused", "graph".
    pub mode: String,
    pub batch: usize,
    /// Tokens per second over all sequences of the batch.
    pub tok_s: Stats,
    /// Whether the greedy tokens equal the main decode's (batch 1) or, for a batch, whether every
    /// sequence (all the same prompt) got the same tokens as the first.
    pub same_tokens: bool,
}

/// Device memory, in bytes. Driver figures are used memory minus the usage before the load (the CUDA
/// context excluded); `method` says how each was taken.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub driver_after_load_bytes: Option<u64>,
    #[serde(default)]
    pub driver_peak_load_bytes: Option<u64>,
    /// Peak over the load and every measured prompt.
    #[serde(default)]
    pub driver_peak_bytes: Option<u64>,
    /// Peak once one prompt filled the whole planned context (`full_context_tokens`).
    #[serde(default)]
    pub driver_peak_full_context_bytes: Option<u64>,
    #[serde(default)]
    pub full_context_tokens: Option<usize>,
    /// Used memory before the load (the CUDA context and anything else on the device).
    #[serde(default)]
    pub driver_baseline_bytes: Option<u64>,
    /// torch's allocator peaks (peers only).
    #[serde(default)]
    pub allocator_peak_bytes: Option<u64>,
    #[serde(default)]
    pub allocator_reserved_peak_bytes: Option<u64>,
    /// What glm-run's own tracker measured (ours only): after load, load peak, peak.
    #[serde(default)]
    pub library_measured_bytes: Option<[u64; 3]>,
    /// The memory plan's total for the chosen precision (ours only).
    #[serde(default)]
    pub planned_bytes: Option<u64>,
    #[serde(default)]
    pub method: Option<String>,
}

/// The best decode rate the memory allows: weights read once per token at the measured copy bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    pub weight_bytes_per_token: u64,
    /// Device-to-device copy, bytes read plus bytes written per second.
    pub copy_bandwidth_bytes_per_s: Stats,
    pub bound_tok_s: f64,
    /// Decode median over the bound.
    pub achieved_fraction: f64,
}

impl Roofline {
    pub fn new(weight_bytes_per_token: u64, bandwidth: Stats, decode_tok_s: f64) -> Result<Self> {
        if weight_bytes_per_token == 0 || bandwidth.median <= 0.0 {
            bail!("a roofline needs weight bytes and a bandwidth above zero");
        }
        let bound_tok_s = bandwidth.median / weight_bytes_per_token as f64;
        Ok(Self {
            weight_bytes_per_token,
            copy_bandwidth_bytes_per_s: bandwidth,
            bound_tok_s,
            achieved_fraction: decode_tok_s / bound_tok_s,
        })
    }
}

/// One runtime at one precision on one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// "glm-run" or "transformers".
    pub runtime: String,
    /// "bf16", "f16", "f32" (dense), "nf4-dq" (NF4 with double quant), "nf4" (without), with "-min" for
    /// the minimum-memory options (quantized lm_head, embedding table in host memory).
    pub variant: String,
    /// Compute dtype.
    pub dtype: String,
    pub device: String,
    pub model: String,
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
    pub warmup: usize,
    pub reps: usize,
    pub load_s: f64,
    pub prefill: Vec<Prefill>,
    pub decode: Decode,
    /// Ours on CUDA: the decode step's modes at batch 1 and batches in the default mode.
    #[serde(default)]
    pub decode_variants: Vec<DecodeVariant>,
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub roofline: Option<Roofline>,
    /// Tokens of context the runtime planned (the KV cache it allocates).
    #[serde(default)]
    pub context_len: Option<usize>,
    #[serde(default)]
    pub notes: Vec<String>,
}

impl RunRecord {
    pub fn is_ours(&self) -> bool {
        self.runtime == GLM_RUN
    }

    pub fn is_nf4(&self) -> bool {
        self.variant.starts_with("nf4")
    }

    pub fn is_min_memory(&self) -> bool {
        self.variant.ends_with("-min")
    }

    /// A short label: "glm-run NF4", "transformers+bnb NF4", "glm-run BF16", ...
    pub fn label(&self) -> String {
        let runtime = if self.is_nf4() && !self.is_ours() {
            format!("{}+bnb", self.runtime)
        } else {
            self.runtime.clone()
        };
        let precision = if self.is_nf4() {
            let dq = if self.variant.starts_with("nf4-dq") {
                ""
            } else {
                " (no DQ)"
            };
            let min = if self.is_min_memory() { " min-mem" } else { "" };
            format!("NF4{dq}{min}")
        } else {
            self.variant.to_uppercase()
        };
        format!("{runtime} {precision}")
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the run record", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a run record (written by glm-bench run or benches/peers.py peer)",
                path.display()
            )
        })
    }
}

/// Writes `value` as pretty JSON through a temporary file, so a failure leaves no half-written file.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomically(path, format!("{text}\n").as_bytes())
}

/// Writes `bytes` to `path` through `path.tmp` and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_take_the_middle_and_the_extremes() {
        let odd = Stats::new(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        assert_eq!(odd.samples, vec![3.0, 1.0, 2.0], "samples keep their order");
        let even = Stats::new(vec![4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(even.median, 3.0);
        assert!((even.relative_spread() - 1.5).abs() < 1e-12);
    }

    #[test]
    fn stats_refuse_nothing_and_non_finite_samples() {
        assert!(Stats::new(vec![]).is_err());
        let err = Stats::new(vec![1.0, f64::INFINITY]).unwrap_err();
        assert!(err.to_string().contains("not a finite number"), "{err}");
    }

    #[test]
    fn roofline_divides_bandwidth_by_bytes() {
        let bw = Stats::new(vec![3.0e12]).unwrap();
        let r = Roofline::new(6_000_000_000, bw.clone(), 400.0).unwrap();
        assert!((r.bound_tok_s - 500.0).abs() < 1e-9);
        assert!((r.achieved_fraction - 0.8).abs() < 1e-12);
        assert!(Roofline::new(0, bw, 1.0).is_err());
    }

    #[test]
    fn a_record_written_by_the_peers_script_parses() {
        // The shape benches/peers.py writes (trimmed samples), with fields glm-bench does not write.
        let json = r#"{"runtime": "transformers", "variant": "nf4-dq", "dtype": "bf16",
            "device": "NVIDIA H100 80GB HBM3", "model": "/tmp/m", "versions": {"torch": "2.11.0"},
            "warmup": 1, "reps": 1, "load_s": 12.5,
            "prefill": [{"prompt_tokens": 128, "ttft_s": {"median": 0.1, "min": 0.1, "max": 0.1, "samples": [0.1]},
                         "tok_s": {"median": 1280, "min": 1280, "max": 1280, "samples": [1280]}}],
            "decode": {"prompt_tokens": 128, "new_tokens": 32, "batch": 1,
                       "tok_s": {"median": 14, "min": 13, "max": 15, "samples": [14]}, "tokens": [1, 2]},
            "memory": {"driver_after_load_bytes": 7000000000, "driver_peak_load_bytes": 9000000000,
                       "driver_peak_bytes": 9100000000, "allocator_peak_bytes": 8000000000,
                       "allocator_reserved_peak_bytes": 8500000000, "method": "polled"}}"#;
        let record: RunRecord = serde_json::from_str(json).unwrap();
        assert_eq!(record.label(), "transformers+bnb NF4");
        assert_eq!(
            record.memory.as_ref().unwrap().driver_peak_bytes,
            Some(9_100_000_000)
        );
        assert!(record.roofline.is_none() && !record.is_ours());
    }

    #[test]
    fn labels_name_runtime_and_precision() {
        let mut record: RunRecord = serde_json::from_value(serde_json::json!({
            "runtime": "glm-run", "variant": "nf4-dq-min", "dtype": "bf16", "device": "d", "model": "m",
            "warmup": 0, "reps": 1, "load_s": 1.0, "prefill": [],
            "decode": {"prompt_tokens": 1, "new_tokens": 2, "batch": 1,
                       "tok_s": {"median": 1, "min": 1, "max": 1, "samples": [1]}, "tokens": []}
        }))
        .unwrap();
        assert_eq!(record.label(), "glm-run NF4 min-mem");
        record.variant = "nf4".into();
        assert_eq!(record.label(), "glm-run NF4 (no DQ)");
        record.variant = "bf16".into();
        assert_eq!(record.label(), "glm-run BF16");
    }

    #[test]
    fn json_is_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\n  \"a\": 1\n}\n"
        );
        assert!(!dir.path().join("x.json.tmp").exists());
        let missing = dir.path().join("no/such/dir/x.json");
        assert!(write_json(&missing, &1).is_err());
        assert!(
            RunRecord::read(&path).is_err(),
            "a JSON that is no run record is refused"
        );
    }
}
