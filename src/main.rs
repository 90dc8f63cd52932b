//! `glm-run`: load a GLM checkpoint (FP16/BF16 or 4-bit NF4), stream an answer, report memory and speed.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use glm::pipeline::{GenerationSettings, Glm, Prompt, RunOptions};
use glm::plan::{human_bytes, parse_bytes, Footprint, MemoryPlan, QuantMode};
use glm::sampling::SamplingConfig;
use glm::DecodeMode;
use indicatif::{ProgressBar, ProgressStyle};

/// The model the README's first command runs: trained for this project, shipped in the repository.
const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo");

#[derive(Parser, Debug)]
#[command(
    name = "glm-run",
    version,
    about = "Run GLM language models in FP16/BF16 or 4-bit NF4"
)]
struct Cli {
    /// The prompt; read from standard input when absent.
    prompt: Option<String>,
    /// A model directory or a Hugging Face Hub id (cache honours HF_HOME and HF_HUB_OFFLINE=1).
    #[arg(long, default_value = DEMO_MODEL)]
    model: String,
    /// Hub revision (branch, tag or commit) for a hub id.
    #[arg(long)]
    revision: Option<String>,
    /// Weight precision: auto lets the memory planner decide.
    #[arg(long, value_enum, default_value_t = Quant::Auto)]
    quant: Quant,
    /// Compute dtype of activations and dense weights.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Context tokens to plan the KV cache for (default: the model's limit, at most 4096).
    #[arg(long)]
    context: Option<usize>,
    /// Cap on usable memory, e.g. 12GiB (also GLM_RUN_MEMORY_LIMIT).
    #[arg(long, value_parser = parse_memory)]
    memory_limit: Option<u64>,
    /// With 4-bit weights, quantize the lm_head too (less memory, slightly different logits).
    #[arg(long)]
    quantize_lm_head: bool,
    /// On a GPU, keep the embedding table in host memory (rows are looked up and copied per step).
    #[arg(long)]
    embeddings_on_host: bool,
    /// How decode steps run on a GPU: graph (fused kernels replayed as one CUDA graph), fused (the same
    /// kernels launched one by one) or plain (op by op, for debugging). All give the same tokens.
    #[arg(long, value_enum, default_value_t = Decode::Graph)]
    decode: Decode,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1.0 = off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// 1.0 = off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f64,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Encode the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Print the memory plan and exit without loading weights.
    #[arg(long)]
    plan: bool,
    /// Write a bitsandbytes-compatible NF4 checkpoint into this new directory and exit.
    #[arg(long, value_name = "DIR")]
    save_quantized: Option<PathBuf>,
    /// One JSON object on stdout instead of streamed text (with --plan: the plan in bytes).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Quant {
    Auto,
    #[value(name = "4bit")]
    FourBit,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Decode {
    Plain,
    Fused,
    Graph,
}

impl From<Decode> for DecodeMode {
    fn from(decode: Decode) -> Self {
        match decode {
            Decode::Plain => DecodeMode::Plain,
            Decode::Fused => DecodeMode::Fused,
            Decode::Graph => DecodeMode::Graph,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F16,
    Bf16,
    F32,
}

fn parse_memory(text: &str) -> std::result::Result<u64, String> {
    parse_bytes(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("glm-run: error: {}", one_line_usage_error(&e));
            return ExitCode::from(e.exit_code().clamp(1, 255) as u8);
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause chain joined, so scripts can show it as is.
            let causes: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("glm-run: error: {}", causes.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// clap's multi-line message (error, possible values or tip, usage) as one line, like every other error.
fn one_line_usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let message = parts.join("; ");
    format!(
        "{}; see glm-run --help",
        message.strip_prefix("error: ").unwrap_or(&message)
    )
}

fn run(cli: &Cli) -> Result<()> {
    let options = run_options(cli)?;
    let dir = glm::hub::resolve_model(&cli.model, cli.revision.as_deref())?;
    if cli.plan {
        let plan = Glm::plan(&dir, &options)?;
        if cli.json {
            println!("{}", plan_json(&plan));
        } else {
            println!("{plan}");
        }
        return Ok(());
    }
    if let Some(out) = &cli.save_quantized {
        return save_quantized(&dir, &options, out);
    }
    let settings = GenerationSettings {
        sampling: SamplingConfig {
            temperature: cli.temperature,
            top_k: cli.top_k,
            top_p: cli.top_p,
            repetition_penalty: cli.repeat_penalty,
            seed: cli.seed,
        },
        max_new_tokens: cli.max_new_tokens,
        decode: cli.decode.into(),
    };
    settings.sampling.validate()?;
    if settings.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let prompt = read_prompt(cli)?;
    let glm = load_with_progress(&dir, options.clone())?;
    for note in glm.model().load_notes() {
        eprintln!("note: {note}");
    }
    let plan = glm.plan_used();
    let quant = plan.choice.to_string();
    if !cli.json {
        eprintln!("{}: {}", quant, plan.reason);
    }
    let mut stdout = std::io::stdout().lock();
    let done = glm.generate(&prompt, &settings, |piece| {
        if !cli.json {
            // A closed stdout (e.g. `| head`) ends the output, not the run.
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let weights = glm.model().weight_bytes() as u64;
    let dtype = dtype_name(options.dtype);
    let device = device_name(&options.device);
    if cli.json {
        let report = serde_json::json!({
            "prompt_tokens": done.prompt_tokens,
            "tokens": done.tokens,
            "text": done.text,
            "finish_reason": done.finish.as_str(),
            "timings": {
                "load_s": glm.load_time().as_secs_f64(),
                "prefill_s": done.timings.prefill_s,
                "decode_s": done.timings.decode_s,
                "prefill_tok_s": done.timings.prefill_tok_s,
                "decode_tok_s": done.timings.decode_tok_s,
            },
            "memory": {
                "planned_bytes": plan.chosen().total(),
                "planned_weight_bytes": plan.chosen().weights(),
                "measured_weight_bytes": weights,
                "peak_rss_bytes": peak_rss_bytes(),
                // Device memory from the driver (null on the CPU).
                "measured": glm.measured_memory().map(|m| serde_json::json!({
                    "after_load_bytes": m.after_load,
                    "peak_load_bytes": m.peak_load,
                    "peak_bytes": m.peak,
                })),
            },
            "quant": quant,
            "dtype": dtype,
            "device": device,
        });
        writeln!(stdout, "{report}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} {dtype} on {device}] finish: {} | load {:.2} s | prefill {} tok at {:.1} tok/s | \
             decode {} tok at {:.1} tok/s | weights {} (planned {}), total planned {}",
            quant,
            done.finish,
            glm.load_time().as_secs_f64(),
            done.prompt_tokens.len(),
            done.timings.prefill_tok_s,
            done.tokens.len(),
            done.timings.decode_tok_s,
            human_bytes(weights),
            human_bytes(plan.chosen().weights()),
            human_bytes(plan.chosen().total()),
        );
        if let Some(m) = glm.measured_memory() {
            eprintln!(
                "device memory measured: {} after load (peak {} while loading), peak {} in all",
                human_bytes(m.after_load),
                human_bytes(m.peak_load),
                human_bytes(m.peak)
            );
        }
    }
    Ok(())
}

/// `--plan --json`: every number of the plan in bytes, for scripts.
fn plan_json(plan: &MemoryPlan) -> serde_json::Value {
    let footprint = |f: &Footprint| {
        serde_json::json!({
            "embedding": f.embedding,
            "attention": f.attention,
            "mlp": f.mlp,
            "norms": f.norms,
            "lm_head": f.lm_head,
            "weights": f.weights(),
            "kv_cache": f.kv_cache,
            "activations": f.activations,
            "overhead": f.overhead,
            "total": f.total(),
        })
    };
    serde_json::json!({
        "dtype": dtype_name(plan.dtype),
        "context_len": plan.context_len,
        "dense": footprint(&plan.dense),
        "nf4": footprint(&plan.nf4),
        "usable_bytes": plan.budget.as_ref().map(|b| b.usable),
        "usable_source": plan.budget.as_ref().map(|b| b.source.as_str()),
        "choice": plan.choice.to_string(),
        "reason": plan.reason,
    })
}

fn run_options(cli: &Cli) -> Result<RunOptions> {
    Ok(RunOptions {
        quant: match cli.quant {
            Quant::Auto => QuantMode::Auto,
            Quant::FourBit => QuantMode::Nf4,
            Quant::None => QuantMode::None,
        },
        dtype: match cli.dtype {
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
            Dtype::F32 => DType::F32,
        },
        device: parse_device(&cli.device)?,
        context_len: cli.context,
        memory_limit: cli.memory_limit,
        quantize_lm_head: cli.quantize_lm_head,
        embeddings_on_host: cli.embeddings_on_host,
        ..RunOptions::default()
    })
}

fn parse_device(text: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !candle_core::utils::cuda_is_available() {
            bail!("--device {text}: this glm-run was built without CUDA; rebuild with --features cuda");
        }
        Device::new_cuda(ordinal)
            .with_context(|| format!("--device {text}: no usable CUDA device {ordinal}"))
    };
    match text {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => Ok(Device::cuda_if_available(0)?),
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => bail!("--device {text}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

fn read_prompt(cli: &Cli) -> Result<Prompt> {
    let text = match &cli.prompt {
        Some(p) => p.clone(),
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading the prompt from standard input (end with Ctrl-D)");
            }
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from standard input")?;
            text.trim_end_matches('\n').to_string()
        }
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty: pass it as an argument or on standard input");
    }
    Ok(if cli.raw {
        Prompt::Raw(text)
    } else {
        Prompt::Chat {
            system: cli.system.clone(),
            user: text,
        }
    })
}

fn save_quantized(dir: &Path, options: &RunOptions, out: &Path) -> Result<()> {
    let written = with_spinner(&format!("quantizing {} to 4 bits", dir.display()), || {
        glm::save::save_quantized(dir, out, &options.nf4)
    })?;
    eprintln!("wrote {} ({})", out.display(), human_bytes(written));
    Ok(())
}

/// Loads the model with a progress bar on stderr (when it is a terminal): bytes read and bytes/s.
fn load_with_progress(dir: &Path, mut options: RunOptions) -> glm::Result<Glm> {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "loading {msg} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {elapsed})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(dir.display().to_string());
    let shown = bar.clone();
    options.progress = Some(glm::LoadProgress::new(move |read, total| {
        shown.set_length(total);
        shown.set_position(read);
    }));
    let result = Glm::load(dir, &options);
    bar.finish_and_clear();
    result
}

/// Runs `work` with a spinner on stderr (when it is a terminal), showing elapsed time.
fn with_spinner<T, E>(
    message: &str,
    work: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"),
    );
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let result = work();
    bar.finish_and_clear();
    result
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Peak resident memory of this process (VmHWM), where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
