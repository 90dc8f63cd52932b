//! glm-run's end-to-end benchmark (issue 9): our runtime against its bandwidth roofline and against
//! transformers (FP16/BF16) and transformers + bitsandbytes (NF4) on the same GPU, in one run.
//!
//! - [`measure`]: `glm-bench run`, one model at one precision through the glm library.
//! - `benches/peers.py`: the same measurements of the peers, in the same [`record::RunRecord`] schema.
//! - [`quality`]: `glm-bench quality`, perplexity and top-1 agreement per precision on the demo model.
//! - [`report`] and [`chart`]: `glm-bench report`, everything merged into `benches/results/`
//!   (`e2e-<date>.json`, `e2e.md`, `e2e.svg`) with the goals judged.
//! - [`device`]: copy bandwidth and the driver's memory, measured beside the runs.
//!
//! `benches/run-gpu.sh` does the whole GPU run in one device call.

pub mod chart;
pub mod device;
pub mod measure;
pub mod quality;
pub mod record;
pub mod report;
