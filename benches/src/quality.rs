//! `glm-bench quality`: what each precision costs in quality, beside what it gains in speed. On the demo
//! model (CPU): held-out perplexity and top-1 agreement with our f32 for f16, NF4 and NF4 with double
//! quant, through `glm::eval` (the method of `models/demo/eval.py`), with transformers' figures from
//! `eval.json`/`eval_windows.json` beside ours where the model directory has them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use glm::eval::{perplexity, top1_agreement, PerplexityOptions};
use glm::pipeline::{Glm, RunOptions};
use glm::plan::QuantMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One precision's quality on the held-out text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityVariant {
    /// "f32", "f16", "nf4", "nf4_double_quant" (the names of eval.json).
    pub name: String,
    pub loss: f64,
    pub perplexity: f64,
    /// Positions where our top-1 id equals our f32's.
    pub top1_agreement_with_f32: f64,
    /// transformers' loss and perplexity for the same precision (eval.json).
    #[serde(default)]
    pub transformers_loss: Option<f64>,
    #[serde(default)]
    pub transformers_perplexity: Option<f64>,
    /// transformers' own top-1 agreement with its f32, on eval_windows.json's subset of windows.
    #[serde(default)]
    pub transformers_top1_agreement_with_f32_subset: Option<f64>,
    /// Our top-1 ids against transformers' for the same precision, on that subset.
    #[serde(default)]
    pub top1_agreement_with_transformers_subset: Option<f64>,
}

/// The quality figures of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityRecord {
    pub model: String,
    pub text: String,
    pub device: String,
    pub window: usize,
    pub predictions: usize,
    /// Windows of eval_windows.json's subset, when it was there.
    #[serde(default)]
    pub subset_windows: Option<usize>,
    pub variants: Vec<QualityVariant>,
}

impl QualityRecord {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a quality record (written by glm-bench quality)",
                path.display()
            )
        })
    }
}

/// The precisions compared, by eval.json's names: (name, quant, dtype, double quant).
const VARIANTS: [(&str, QuantMode, DType, bool); 4] = [
    ("f32", QuantMode::None, DType::F32, false),
    ("f16", QuantMode::None, DType::F16, false),
    ("nf4", QuantMode::Nf4, DType::F32, false),
    ("nf4_double_quant", QuantMode::Nf4, DType::F32, true),
];

/// Perplexity and top-1 agreement of every precision of the model in `dir` on `text_file` (default
/// `dir/heldout.txt`), on the CPU.
pub fn evaluate(
    dir: &Path,
    text_file: Option<&Path>,
    options: &PerplexityOptions,
) -> Result<QualityRecord> {
    let text_path = text_file.map_or_else(|| dir.join("heldout.txt"), Path::to_path_buf);
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("{}: cannot read the held-out text", text_path.display()))?;
    let reference = TransformersReference::open(dir)?;
    let mut results = Vec::new();
    for (name, quant, dtype, double_quant) in VARIANTS {
        let run = RunOptions {
            quant,
            dtype,
            device: Device::Cpu,
            nf4: nf4::QuantOptions {
                double_quant,
                ..nf4::QuantOptions::default()
            },
            ..RunOptions::default()
        };
        let glm =
            Glm::load(dir, &run).with_context(|| format!("loading {} ({name})", dir.display()))?;
        let result = perplexity(glm.model(), glm.tokenizer(), &text, options)?;
        eprintln!(
            "glm-bench: {name}: loss {:.4}, perplexity {:.3}",
            result.loss(),
            result.perplexity()
        );
        results.push((name, result));
    }
    let f32_top1 = &results[0].1.top1;
    let their_f32 = reference.as_ref().and_then(|r| r.variant("f32"));
    let mut variants = Vec::new();
    for (name, result) in &results {
        let theirs = reference.as_ref().and_then(|r| r.variant(name));
        // Top-1 ids on transformers' subset: the first windows, in the same order as ours.
        let on_subset =
            |t: &ReferenceVariant| !t.top1.is_empty() && t.top1.len() <= result.top1.len();
        variants.push(QualityVariant {
            name: name.to_string(),
            loss: result.loss(),
            perplexity: result.perplexity(),
            top1_agreement_with_f32: top1_agreement(&result.top1, f32_top1)?,
            transformers_loss: theirs.as_ref().map(|t| t.loss),
            transformers_perplexity: theirs.as_ref().map(|t| t.perplexity),
            transformers_top1_agreement_with_f32_subset: match (&theirs, &their_f32) {
                (Some(t), Some(f)) if on_subset(t) => Some(top1_agreement(&t.top1, &f.top1)?),
                _ => None,
            },
            top1_agreement_with_transformers_subset: match &theirs {
                Some(t) if on_subset(t) => {
                    Some(top1_agreement(&result.top1[..t.top1.len()], &t.top1)?)
                }
                _ => None,
            },
        });
    }
    Ok(QualityRecord {
        model: dir.display().to_string(),
        text: text_path.display().to_string(),
        device: "cpu".into(),
        window: options.window,
        predictions: results[0].1.predictions(),
        subset_windows: reference.map(|r| r.subset_windows),
        variants,
    })
}

/// transformers' figures for one precision.
struct ReferenceVariant {
    loss: f64,
    perplexity: f64,
    top1: Vec<u32>,
}

/// `eval.json` (loss and perplexity per precision) and `eval_windows.json` (top-1 ids on a subset).
struct TransformersReference {
    eval: Value,
    windows: Value,
    subset_windows: usize,
}

impl TransformersReference {
    /// None when the model directory has no eval.json (a model without transformers' reference).
    fn open(dir: &Path) -> Result<Option<Self>> {
        let read = |name: &str| -> Result<Option<Value>> {
            let path: PathBuf = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not valid JSON; re-run models/demo/eval.py",
                    path.display()
                )
            })?))
        };
        let (Some(eval), Some(windows)) = (read("eval.json")?, read("eval_windows.json")?) else {
            return Ok(None);
        };
        let subset_windows = windows["subset_windows"].as_u64().unwrap_or(0) as usize;
        Ok(Some(Self {
            eval,
            windows,
            subset_windows,
        }))
    }

    fn variant(&self, name: &str) -> Option<ReferenceVariant> {
        let result = &self.eval["results"][name];
        let top1 = self.windows["variants"][name]["top1_subset"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|v| v.as_u64().map(|x| x as u32))
                    .collect()
            })
            .unwrap_or_default();
        Some(ReferenceVariant {
            loss: result["heldout_loss"].as_f64()?,
            perplexity: result["heldout_perplexity"].as_f64()?,
            top1,
        })
    }
}
