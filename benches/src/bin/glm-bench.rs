//! `glm-bench`: measure glm-run (`run`), the demo model's quality per precision (`quality`), and merge
//! ours and the peers' records into benches/results/ (`report`). See benches/src/lib.rs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use glm::eval::PerplexityOptions;
use glm_bench::measure::{self, RunSpec};
use glm_bench::quality::{self, QualityRecord};
use glm_bench::record::{write_atomically, write_json, RunRecord};
use glm_bench::report::Report;
use glm_bench::{chart, device};

#[derive(Parser, Debug)]
#[command(name = "glm-bench", version, about = "glm-run's end-to-end benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure one model at one precision through the glm library; writes a run record (JSON).
    Run(RunArgs),
    /// Perplexity and top-1 agreement with f32 of f16, NF4 and NF4 with double quant (CPU).
    Quality {
        /// A model directory with heldout.txt (and transformers' eval.json/eval_windows.json); paths
        /// are relative to the working directory (the repository root under `cargo run`).
        #[arg(long, default_value = "models/demo")]
        model: PathBuf,
        /// The held-out text (default: MODEL/heldout.txt).
        #[arg(long)]
        text: Option<PathBuf>,
        /// Score only the first N windows (default: all).
        #[arg(long)]
        max_windows: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge run records (ours and the peers') and a quality record into e2e-DATE.json, e2e.md, e2e.svg.
    Report {
        /// Run records: glm-bench run and benches/peers.py peer outputs.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        #[arg(long)]
        quality: Option<PathBuf>,
        /// JSON with "device" and "driver" (benches/peers.py gpu-env) and optionally "commit".
        #[arg(long)]
        env: Option<PathBuf>,
        /// The commit the binaries were built from (overrides the env file's).
        #[arg(long)]
        commit: Option<String>,
        /// Date of the run, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        date: Option<String>,
        #[arg(long, default_value = "benches/results")]
        out_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Model directory: the synthetic GLM-4-9B-shaped checkpoint (benches/peers.py make-synthetic),
    /// models/demo, or any GLM checkpoint.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    quant: Quant,
    /// NF4 without double-quantized absmax.
    #[arg(long)]
    no_double_quant: bool,
    /// The minimum-memory options: 4-bit lm_head and the embedding table in host memory.
    #[arg(long)]
    min_memory: bool,
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Context tokens to plan (the KV cache allocated).
    #[arg(long, default_value_t = 4096)]
    context: usize,
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    prompt_lengths: Vec<usize>,
    /// New tokens of each decode run (after a prompt of the first length).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also one prefill that fills the planned context, for the peak memory at that context.
    #[arg(long)]
    full_context: bool,
    /// Prompt ids (default: MODEL/bench-prompts.json, else seeded random ids).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Where to write the run record (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Quant {
    None,
    #[value(name = "4bit")]
    FourBit,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("glm-bench: error: {}", causes.join(": "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let spec = RunSpec {
                model: args.model,
                nf4: matches!(args.quant, Quant::FourBit),
                double_quant: !args.no_double_quant,
                min_memory: args.min_memory,
                dtype: match args.dtype {
                    Dtype::F32 => DType::F32,
                    Dtype::F16 => DType::F16,
                    Dtype::Bf16 => DType::BF16,
                },
                device: device::parse_device(&args.device)?,
                context: args.context,
                prompt_lengths: args.prompt_lengths,
                new_tokens: args.new_tokens,
                warmup: args.warmup,
                reps: args.reps,
                full_context: args.full_context,
                prompts: args.prompts,
            };
            let record = measure::run(&spec)?;
            output(args.out.as_deref(), &record)
        }
        Command::Quality {
            model,
            text,
            max_windows,
            out,
        } => {
            let options = PerplexityOptions {
                max_windows,
                ..PerplexityOptions::default()
            };
            let record = quality::evaluate(&model, text.as_deref(), &options)?;
            write_json(&out, &record)
        }
        Command::Report {
            runs,
            quality,
            env,
            commit,
            date,
            out_dir,
        } => {
            let runs = runs
                .iter()
                .map(|p| RunRecord::read(p))
                .collect::<Result<Vec<_>>>()?;
            let quality = quality.as_deref().map(QualityRecord::read).transpose()?;
            let env = env
                .as_deref()
                .map(read_env)
                .transpose()?
                .unwrap_or_default();
            let date = date.unwrap_or_else(today);
            let report = Report::new(date, env.driver, commit.or(env.commit), runs, quality)?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("{}: cannot create", out_dir.display()))?;
            let json = out_dir.join(format!("e2e-{}.json", report.date));
            write_json(&json, &report)?;
            let title = format!("glm-run vs transformers on {}", report.device);
            write_atomically(
                &out_dir.join("e2e.svg"),
                chart::svg(&report.runs, &title)?.as_bytes(),
            )?;
            write_atomically(
                &out_dir.join("e2e.md"),
                report.markdown(Some("e2e.svg")).as_bytes(),
            )?;
            eprintln!(
                "glm-bench: wrote {}, e2e.md and e2e.svg in {}",
                json.display(),
                out_dir.display()
            );
            Ok(())
        }
    }
}

fn output(out: Option<&Path>, record: &RunRecord) -> Result<()> {
    match out {
        Some(path) => write_json(path, record),
        None => {
            println!("{}", serde_json::to_string_pretty(record)?);
            Ok(())
        }
    }
}

/// The GPU machine's description (benches/peers.py gpu-env).
#[derive(serde::Deserialize, Default)]
struct Env {
    driver: Option<String>,
    commit: Option<String>,
}

fn read_env(path: &Path) -> Result<Env> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: expected {{\"driver\": ..}}", path.display()))
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    glm_bench::report::utc_date(secs)
}
