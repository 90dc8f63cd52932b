//! The memory planner: how many bytes a model takes in FP16/BF16 and in NF4, before any weight is read,
//! and which of the two to load.
//!
//! Weight sizes follow from `config.json` alone (the loader checks every tensor's shape against the same
//! config), so a plan costs nothing but reading that file. The rule for `--quant auto`: dense when the
//! dense total fits the usable memory with a safety margin, NF4 when only that fits, else an error that
//! says how much is missing and which option would fit (4 bits, a 4-bit lm_head, the embedding table
//! in host memory, a shorter context).

use std::fmt;

use candle_core::DType;

use crate::config::Config;
use crate::error::{GlmError, Result};

/// What the caller asked for with `--quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// Let the planner decide.
    #[default]
    Auto,
    /// 4-bit NF4 linear weights.
    Nf4,
    /// Dense weights in the compute dtype.
    None,
}

/// How the weights end up held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Dense,
    Nf4,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Dense => "dense",
            Precision::Nf4 => "nf4",
        })
    }
}

/// Fraction of the usable memory a plan may fill: the rest absorbs allocator fragmentation and
/// estimates that run short.
pub const SAFETY_MARGIN: f64 = 0.9;

/// Tokens the prefill processes in one step: longer prompts are run in chunks of this many queries,
/// which bounds the activations.
pub const PREFILL_CHUNK: usize = 512;

/// Device memory the CUDA runtime takes beyond what the plan counts piece by piece: cuBLAS workspaces,
/// loaded kernel modules, the allocator's rounding. The CUDA context itself is already excluded from
/// the free memory the driver reports once the device is open.
pub const CUDA_RUNTIME_OVERHEAD: u64 = 512 << 20;

/// What the plan is for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Compute dtype: dense weights, activations and the KV cache are held in it.
    pub dtype: DType,
    /// Tokens of context (prompt + generated) the KV cache must hold.
    pub context_len: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// How NF4 weights are quantized.
    pub nf4: nf4::QuantOptions,
    /// Bytes the runtime itself takes on the device (CUDA context, cuBLAS workspace); 0 on the CPU.
    pub runtime_overhead: u64,
    /// With 4-bit weights, quantize the lm_head too (a tied head gets a 4-bit copy of its own).
    pub quantize_lm_head: bool,
    /// The embedding table stays in host memory, off the device (a tied head gets a copy on it).
    pub embeddings_on_host: bool,
    /// The device has memory of its own (CUDA), so keeping the embedding table in host memory saves
    /// some: error messages then suggest it.
    pub separate_device_memory: bool,
}

/// Bytes of one way of holding the model, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// 0 when the table is kept in host memory, off the device.
    pub embedding: u64,
    /// q/k/v/o projections with their biases.
    pub attention: u64,
    /// gate_up and down projections.
    pub mlp: u64,
    pub norms: u64,
    /// 0 when tied to the embedding table on the device.
    pub lm_head: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub overhead: u64,
}

impl Footprint {
    pub fn weights(&self) -> u64 {
        self.embedding + self.attention + self.mlp + self.norms + self.lm_head
    }

    pub fn total(&self) -> u64 {
        self.weights() + self.kv_cache + self.activations + self.overhead
    }
}

/// Memory the model may use, and where that figure came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBudget {
    pub usable: u64,
    /// e.g. "MemAvailable in /proc/meminfo" or "GLM_RUN_MEMORY_LIMIT".
    pub source: String,
}

/// The dense and NF4 footprints side by side, and the decision.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub dense: Footprint,
    pub nf4: Footprint,
    pub dtype: DType,
    pub context_len: usize,
    pub budget: Option<MemoryBudget>,
    pub choice: Precision,
    /// One sentence: why `choice`.
    pub reason: String,
}

impl MemoryPlan {
    /// Plans `config` for `request` and decides per `mode`. `budget` None means unknown memory: the
    /// decision then follows `mode`, with `Auto` keeping dense weights.
    pub fn new(
        config: &Config,
        request: &PlanRequest,
        mode: QuantMode,
        budget: Option<MemoryBudget>,
    ) -> Result<Self> {
        if request.context_len == 0 || request.batch == 0 {
            return Err(GlmError::Input(
                "the memory plan needs a context length and a batch size of at least 1".into(),
            ));
        }
        let dense = footprint(config, request, Precision::Dense)?;
        let nf4 = footprint(config, request, Precision::Nf4)?;
        let prequantized = config.quantization.is_some();
        let (choice, reason) = decide(&dense, &nf4, mode, prequantized, budget.as_ref())?;
        if let Some(b) = budget.as_ref() {
            let chosen = if choice == Precision::Dense {
                &dense
            } else {
                &nf4
            };
            if !fits(chosen, b) {
                return Err(out_of_memory(config, request, choice, chosen, b));
            }
        }
        Ok(Self {
            dense,
            nf4,
            dtype: request.dtype,
            context_len: request.context_len,
            budget,
            choice,
            reason,
        })
    }

    /// The footprint of the chosen precision.
    pub fn chosen(&self) -> &Footprint {
        match self.choice {
            Precision::Dense => &self.dense,
            Precision::Nf4 => &self.nf4,
        }
    }
}

/// True when `f` fits `budget` with the safety margin.
fn fits(f: &Footprint, budget: &MemoryBudget) -> bool {
    f.total() as f64 <= budget.usable as f64 * SAFETY_MARGIN
}

/// The decision for `mode` (the chosen footprint is checked against the budget afterwards).
fn decide(
    dense: &Footprint,
    nf4: &Footprint,
    mode: QuantMode,
    prequantized: bool,
    budget: Option<&MemoryBudget>,
) -> Result<(Precision, String)> {
    let fits = |f: &Footprint| budget.is_none_or(|b| fits(f, b));
    let within = |f: &Footprint| match budget {
        Some(b) => format!(
            "{} of the {} usable ({})",
            human_bytes(f.total()),
            human_bytes(b.usable),
            b.source
        ),
        None => format!("{} (usable memory unknown)", human_bytes(f.total())),
    };
    let (choice, reason) =
        match mode {
            QuantMode::Nf4 => (Precision::Nf4, format!("4-bit requested: {}", within(nf4))),
            QuantMode::None if prequantized => return Err(GlmError::Input(
                "--quant none asks for dense weights, but this checkpoint stores 4-bit weights: \
                 use --quant 4bit (or auto), or load the original dense checkpoint"
                    .into(),
            )),
            QuantMode::None => (
                Precision::Dense,
                format!("dense requested: {}", within(dense)),
            ),
            QuantMode::Auto if prequantized => (
                Precision::Nf4,
                format!("the checkpoint is stored in 4 bits: {}", within(nf4)),
            ),
            QuantMode::Auto if fits(dense) => (
                Precision::Dense,
                format!(
                    "dense weights fit with room for the KV cache: {}",
                    within(dense)
                ),
            ),
            QuantMode::Auto => (
                Precision::Nf4,
                format!(
                    "dense weights would need {}, more than fits; 4-bit needs {}",
                    human_bytes(dense.total()),
                    within(nf4)
                ),
            ),
        };
    Ok((choice, reason))
}

/// The error for a `chosen` footprint that does not fit: how much is missing, and each option that
/// alone would fit, then the longest context that fits as asked or, failing that, with every option.
fn out_of_memory(
    config: &Config,
    request: &PlanRequest,
    choice: Precision,
    chosen: &Footprint,
    budget: &MemoryBudget,
) -> GlmError {
    let needed = |f: &Footprint| (f.total() as f64 / SAFETY_MARGIN) as u64;
    let missing = needed(chosen).saturating_sub(budget.usable);
    let every_option = PlanRequest {
        quantize_lm_head: true,
        embeddings_on_host: request.embeddings_on_host || request.separate_device_memory,
        ..request.clone()
    };
    // Each option alone as (request with it, precision with it).
    let mut options = Vec::new();
    if choice == Precision::Dense {
        options.push((request.clone(), Precision::Nf4));
    }
    if !request.quantize_lm_head {
        let with = PlanRequest {
            quantize_lm_head: true,
            ..request.clone()
        };
        options.push((with, Precision::Nf4));
    }
    if every_option.embeddings_on_host && !request.embeddings_on_host {
        let with = PlanRequest {
            embeddings_on_host: true,
            ..request.clone()
        };
        options.push((with, Precision::Nf4));
    }
    let mut fitting: Vec<String> = options
        .iter()
        .filter_map(|(r, p)| {
            let f = footprint(config, r, *p).ok()?;
            fits(&f, budget).then(|| {
                format!(
                    "{}(needs {})",
                    flags(request, choice, r, *p),
                    human_bytes(needed(&f))
                )
            })
        })
        .collect();
    for (r, p) in [(request, choice), (&every_option, Precision::Nf4)] {
        if let Some((context, f)) = longest_context(config, r, p, budget) {
            fitting.push(format!(
                "{}--context {context} (needs {})",
                flags(request, choice, r, p),
                human_bytes(needed(&f))
            ));
            break;
        }
    }
    let advice = if fitting.is_empty() {
        "nothing fits, even in 4 bits with every option and a context of one token: use a device \
         with more memory"
            .to_string()
    } else {
        format!("would fit: {}", fitting.join("; "))
    };
    GlmError::OutOfMemory(format!(
        "the {choice} model needs {} (with a {:.0}% safety margin) but only {} is usable ({}): {} \
         missing; {advice}",
        human_bytes(needed(chosen)),
        (1.0 - SAFETY_MARGIN) * 100.0,
        human_bytes(budget.usable),
        budget.source,
        human_bytes(missing)
    ))
}

/// The command-line flags that turn a plan for (`from`, `from_precision`) into one for (`to`,
/// `to_precision`), each followed by a space.
fn flags(
    from: &PlanRequest,
    from_precision: Precision,
    to: &PlanRequest,
    to_precision: Precision,
) -> String {
    let mut flags = String::new();
    if to_precision != from_precision {
        flags.push_str("--quant 4bit ");
    }
    if to.quantize_lm_head && !from.quantize_lm_head {
        flags.push_str("--quantize-lm-head ");
    }
    if to.embeddings_on_host && !from.embeddings_on_host {
        flags.push_str("--embeddings-on-host ");
    }
    flags
}

/// The longest context shorter than the requested one that fits the budget, with its footprint.
fn longest_context(
    config: &Config,
    request: &PlanRequest,
    precision: Precision,
    budget: &MemoryBudget,
) -> Option<(usize, Footprint)> {
    let at = |context_len: usize| {
        let r = PlanRequest {
            context_len,
            ..request.clone()
        };
        footprint(config, &r, precision)
            .ok()
            .filter(|f| fits(f, budget))
    };
    at(1)?;
    // Footprints grow with the context: bisect for the last length that fits.
    let (mut fits_at, mut too_long) = (1, request.context_len);
    while too_long - fits_at > 1 {
        let mid = fits_at + (too_long - fits_at) / 2;
        if at(mid).is_some() {
            fits_at = mid;
        } else {
            too_long = mid;
        }
    }
    Some((fits_at, at(fits_at)?))
}

/// Bytes of every part of the model held at `precision`, for the request.
pub fn footprint(
    config: &Config,
    request: &PlanRequest,
    precision: Precision,
) -> Result<Footprint> {
    let elem = request.dtype.size_in_bytes() as u64;
    let h = config.hidden_size as u64;
    let q_out = (config.num_attention_heads * config.head_dim) as u64;
    let kv_out = (config.num_key_value_heads * config.head_dim) as u64;
    let inter = config.intermediate_size as u64;
    let vocab = config.vocab_size as u64;
    // A linear weight [out, in] as held: dense in the compute dtype, or packed 4-bit.
    let linear = |out: u64, inp: u64| -> Result<u64> {
        match precision {
            Precision::Dense => Ok(out * inp * elem),
            Precision::Nf4 => nf4::packed_bytes((out * inp) as usize, &request.nf4)
                .map(|b| b as u64)
                .map_err(|e| GlmError::Input(format!("4-bit options: {e}"))),
        }
    };
    let bias = if config.attention_bias {
        (q_out + 2 * kv_out) * elem
    } else {
        0
    };
    let attention = linear(q_out, h)? + 2 * linear(kv_out, h)? + linear(h, q_out)? + bias;
    let mlp = linear(2 * inter, h)? + linear(h, inter)?;
    let norms_per_layer = if config.architecture.has_post_sublayer_norms() {
        4
    } else {
        2
    };
    let layers = config.num_hidden_layers as u64;
    let kv_cache = 2 * layers * request.batch as u64 * kv_out * request.context_len as u64 * elem;
    // bitsandbytes and we keep the output projection dense unless asked otherwise.
    let quantized_head = request.quantize_lm_head && precision == Precision::Nf4;
    let lm_head = if quantized_head {
        linear(vocab, h)?
    } else if config.tie_word_embeddings && !request.embeddings_on_host {
        0
    } else {
        vocab * h * elem
    };
    Ok(Footprint {
        embedding: if request.embeddings_on_host {
            0
        } else {
            vocab * h * elem
        },
        attention: layers * attention,
        mlp: layers * mlp,
        norms: (layers * norms_per_layer + 1) * h * elem,
        lm_head,
        kv_cache,
        activations: activation_bytes(config, request),
        overhead: request.runtime_overhead,
    })
}

/// The largest working set of one forward step: hidden states, the MLP's widest intermediate, one
/// layer's attention scores (f32) and the f32 logits, plus one dequantized weight for the CPU's 4-bit
/// path. An estimate that errs high.
fn activation_bytes(config: &Config, request: &PlanRequest) -> u64 {
    let elem = request.dtype.size_in_bytes() as u64;
    let tokens = (request.batch * request.context_len.min(PREFILL_CHUNK)) as u64;
    let h = config.hidden_size as u64;
    let inter = config.intermediate_size as u64;
    let hidden_states = tokens * (4 * h + 3 * inter) * elem;
    let scores = request.batch as u64
        * config.num_attention_heads as u64
        * request.context_len.min(PREFILL_CHUNK) as u64
        * request.context_len as u64
        * 4;
    let logits = request.batch as u64 * config.vocab_size as u64 * 4;
    let widest_weight = 2 * inter * h * elem;
    hidden_states + scores + logits + widest_weight
}

/// Reads one line of a [`Footprint`] for the plan table.
type FootprintField = fn(&Footprint) -> u64;

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        writeln!(
            f,
            "memory plan ({dtype}, context {} tokens)",
            self.context_len
        )?;
        writeln!(f, "  {:<22}{:>12}{:>12}", "", dtype, "nf4")?;
        let rows: [(&str, FootprintField); 10] = [
            ("embedding", |p| p.embedding),
            ("attention", |p| p.attention),
            ("mlp", |p| p.mlp),
            ("norms", |p| p.norms),
            ("lm_head", |p| p.lm_head),
            ("weights", Footprint::weights),
            ("kv cache", |p| p.kv_cache),
            ("activations", |p| p.activations),
            ("framework overhead", |p| p.overhead),
            ("total", Footprint::total),
        ];
        for (name, get) in rows {
            writeln!(
                f,
                "  {name:<22}{:>12}{:>12}",
                human_bytes(get(&self.dense)),
                human_bytes(get(&self.nf4))
            )?;
        }
        if let Some(b) = &self.budget {
            writeln!(
                f,
                "  usable memory: {} ({})",
                human_bytes(b.usable),
                b.source
            )?;
        }
        write!(f, "  decision: {} ({})", self.choice, self.reason)
    }
}

/// `1.5 GiB`, `12.0 MiB`, `800 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Parses `12GiB`, `12 GB`, `800M`, `1024` (bytes) into bytes; binary and decimal units both accepted.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        GlmError::Input(format!(
            "'{text}' is not a memory size: write e.g. 12GiB, 800MB or 1024"
        ))
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        other => {
            return Err(GlmError::Input(format!(
                "unknown unit '{other}' in memory size '{text}': use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            )))
        }
    };
    Ok((value * scale) as u64)
}

/// Memory usable on the CPU: `MemAvailable` from /proc/meminfo.
pub fn host_memory_budget() -> Option<MemoryBudget> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(MemoryBudget {
        usable: kib * 1024,
        source: "MemAvailable in /proc/meminfo".into(),
    })
}
