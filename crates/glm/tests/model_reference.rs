//! The decoder against transformers (and transformers+bitsandbytes) on the tiny fixture models made by
//! tests/fixtures/make_model_fixtures.py: logits of the prefill and of every decode step, 32-step
//! greedy continuations, the KV cache against full recompute, batches, f16/bf16, NF4. An ignored test
//! runs the same checks (f32, batch, and f16/bf16 where transformers' own half runs are recorded) over
//! the cases of the differential sweep tests/fixtures/sweep_configs.py.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use glm::pipeline::{Glm, RunOptions};
use glm::plan::Precision;
use glm::{Architecture, LoadOptions, Model};

mod common;

use common::{fixture, greedy, max_abs, row, teacher_forced};

/// Decode steps of the fixtures' references (sweep cases record fewer).
const STEPS: usize = 32;
/// The bound for f32: max |ours - transformers| ≤ 1e-4 × max |logit|.
const F32_TOLERANCE: f32 = 1e-4;

/// What transformers recorded for the prompts of a fixture (two) or sweep case.
struct Reference {
    prompts: Vec<Vec<u32>>,
    /// Per prompt: logits at every prompt position, [prompt_len, vocab].
    prefill: Vec<Tensor>,
    /// Per prompt: logits after feeding each greedy token, [decode steps, vocab].
    decode: Vec<Tensor>,
    /// Per prompt: the greedy tokens, one per decode step.
    greedy: Vec<Vec<u32>>,
    /// max |logit| over everything recorded.
    scale: f32,
}

fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|x| x as u32).collect())
        .collect()
}

fn reference(name: &str) -> Reference {
    reference_at(&fixture(name))
}

/// The reference of the model directory `dir`.
fn reference_at(dir: &Path) -> Reference {
    let path = dir.join("reference.safetensors");
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let per_prompt = |key: &str| -> Vec<Tensor> {
        let all = &t[key];
        (0..all.dim(0).unwrap())
            .map(|i| all.get(i).unwrap())
            .collect()
    };
    let prefill = per_prompt("prefill_logits");
    let decode = per_prompt("decode_logits");
    let scale = prefill
        .iter()
        .chain(&decode)
        .map(max_abs)
        .fold(0.0, f32::max);
    Reference {
        prompts: ids(&t["prompt_ids"]),
        greedy: ids(&t["greedy_tokens"]),
        prefill,
        decode,
        scale,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

fn load(name: &str, options: LoadOptions) -> Model {
    Model::load(fixture(name), &options).unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

fn with_dtype(dtype: DType) -> LoadOptions {
    LoadOptions {
        dtype,
        ..LoadOptions::default()
    }
}

/// Prefill and every decode step within `bound` (absolute) of the reference, for both prompts;
/// returns the largest difference.
fn check_logits(model: &Model, r: &Reference, bound: f32, what: &str) -> f32 {
    let mut worst = 0.0f32;
    for (i, prompt) in r.prompts.iter().enumerate() {
        let (prefill, decode) = teacher_forced(model, prompt, &r.greedy[i]);
        let p = max_diff(&prefill, &r.prefill[i]);
        let d = max_diff(&decode, &r.decode[i]);
        // Decode steps one by one, so a failure names the step.
        for step in 0..decode.dim(0).unwrap() {
            let diff = max_diff(&decode.get(step).unwrap(), &r.decode[i].get(step).unwrap());
            assert!(
                diff <= bound,
                "{what}: prompt {i} decode step {step}: max |diff| {diff} > {bound}"
            );
        }
        assert!(
            p <= bound,
            "{what}: prompt {i} prefill: max |diff| {p} > {bound}"
        );
        worst = worst.max(p).max(d);
    }
    eprintln!(
        "{what}: max |logit diff| {worst:.3e} (bound {bound:.3e}, scale {:.3})",
        r.scale
    );
    worst
}

/// Loads the model directory `dir` in f32 and checks it against its reference: logits within
/// [`F32_TOLERANCE`] of the scale, the same greedy tokens.
fn check_f32_dir(dir: &Path) -> Model {
    let what = dir.file_name().unwrap().to_string_lossy();
    let model = Model::load(dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let r = reference_at(dir);
    check_logits(&model, &r, F32_TOLERANCE * r.scale, &what);
    for (i, prompt) in r.prompts.iter().enumerate() {
        assert_eq!(
            greedy(&model, prompt, r.greedy[i].len()),
            r.greedy[i],
            "{what}: greedy tokens, prompt {i}"
        );
    }
    model
}

fn check_f32_fixture(name: &str, arch: Architecture) {
    let model = check_f32_dir(&fixture(name));
    assert_eq!(model.config().architecture, arch);
}

/// The tensors of every safetensors file of the model directory `dir`, by name.
fn load_tensors(dir: &Path) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("model") && name.ends_with(".safetensors") {
            tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu).unwrap());
        }
    }
    tensors
}

/// For a 4-bit sweep case (reference.json names the dense case beside it and the dtype transformers
/// loaded it in to quantize): every stored 4-bit weight has the bytes nf4 quantizes the dense weight to,
/// in that dtype, with the stored options, as quantizing at load does.
fn check_quantized_like_bitsandbytes(dir: &Path) {
    let summary = summary(dir);
    let case = &summary["case"];
    let Some(dense) = case["quantized_from"].as_str() else {
        return;
    };
    let load_dtype = match case["quant"]["dtype"].as_str() {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        _ => DType::F32,
    };
    let dense = load_tensors(&dir.parent().unwrap().join(dense));
    let stored = glm::Checkpoint::open(dir).unwrap();
    let names = nf4::quantized_weight_names(stored.tensor_names());
    assert!(!names.is_empty(), "{}: no 4-bit weights", dir.display());
    for name in names {
        let packed = nf4::Nf4Tensor::read(&name, |key| stored.view(key).ok())
            .unwrap()
            .unwrap();
        let values = dense[&name]
            .to_dtype(load_dtype)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        let ours =
            nf4::Nf4Tensor::quantize_f32(&values, packed.shape(), &packed.options()).unwrap();
        assert_eq!(
            ours.packed(),
            packed.packed(),
            "{}: {name} codes",
            dir.display()
        );
        assert_eq!(
            ours.absmax_state(),
            packed.absmax_state(),
            "{}: {name} absmax",
            dir.display()
        );
    }
}

/// The differential sweep of tests/fixtures/sweep_configs.py: every case directory listed in
/// GLM_SWEEP_DIRS (separated by ':') must match transformers as a fixture does (f32; its two prompts
/// batched; f16 and bf16 when reference.json records transformers' own half-precision error), and a
/// 4-bit case's weights must be what quantizing its dense case at load gives. Each failure is printed as
/// it happens; the test fails at the end, naming every case that did.
#[test]
#[ignore = "needs GLM_SWEEP_DIRS, made by tests/fixtures/sweep_configs.py"]
fn sweep_cases_match_transformers() {
    let dirs = std::env::var_os("GLM_SWEEP_DIRS").expect(
        "GLM_SWEEP_DIRS: case directories of tests/fixtures/sweep_configs.py, ':'-separated",
    );
    let dirs: Vec<_> = std::env::split_paths(&dirs).collect();
    let failed: Vec<String> = dirs
        .iter()
        .filter(|dir| {
            std::panic::catch_unwind(|| {
                let model = check_f32_dir(dir);
                let what = dir.file_name().unwrap().to_string_lossy();
                // Batching may change the f32 summation order (a decode step's matmul over two rows),
                // as a different implementation does: the bound against transformers applies.
                let r = reference_at(dir);
                check_batch(&model, &r, F32_TOLERANCE * r.scale, &what);
                if has_half_errors(dir) {
                    check_half_dir(dir);
                }
                check_quantized_like_bitsandbytes(dir);
            })
            .is_err()
        })
        .map(|dir| dir.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} sweep cases disagree with transformers:\n{}",
        failed.len(),
        dirs.len(),
        failed.join("\n")
    );
}

#[test]
fn glm_sharded_matches_transformers() {
    check_f32_fixture("glm", Architecture::Glm);
}

#[test]
fn glm4_tied_matches_transformers() {
    check_f32_fixture("glm4", Architecture::Glm4);
}

#[test]
fn glm4v_text_decoder_matches_transformers() {
    check_f32_fixture("glm4v", Architecture::Glm4v);
}

#[test]
fn chatglm_layout_matches_equivalent_glm() {
    check_f32_fixture("chatglm", Architecture::ChatGlm);
}

#[test]
fn glm4_partial_rotary_as_transformers_5_saves_it() {
    // config.json as transformers 5 writes it: rope_parameters' partial_rotary_factor 0.25 beside a stale
    // top-level 0.5; and the rotary dim int(20 × 0.25) = 5 is odd.
    check_f32_fixture("glm4-rotary", Architecture::Glm4);
}

#[test]
fn glm4v_rotary_takes_the_head_dim_key() {
    // text_config's head_dim (12) sizes the rotary embedding but not the heads (16); num_key_value_heads
    // is left out.
    check_f32_fixture("glm4v-head-dim", Architecture::Glm4v);
}

#[test]
fn chatglm_default_keys_match_equivalent_glm() {
    // kv_channels and multi_query_group_num left out of config.json.
    check_f32_fixture("chatglm-defaults", Architecture::ChatGlm);
}

#[test]
fn vision_weights_are_reported_once() {
    let model = load("glm4v", LoadOptions::default());
    let vision: Vec<&String> = model
        .load_notes()
        .iter()
        .filter(|n| n.contains("model.visual"))
        .collect();
    assert_eq!(vision.len(), 1, "notes: {:?}", model.load_notes());
    // The dense text fixtures have nothing to ignore (ChatGLM's stored rotary table is expected).
    for name in ["glm", "glm4", "chatglm"] {
        assert!(
            load(name, LoadOptions::default()).load_notes().is_empty(),
            "{name}"
        );
    }
}

#[test]
fn glm4v_legacy_names_load_too() {
    // GLM-4.1V checkpoints written before transformers' VLM refactor: `model.layers.*`, `visual.*`.
    let src = fixture("glm4v");
    let t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(name, tensor)| {
            let name = name
                .replace("model.language_model.", "model.")
                .replace("model.visual.", "visual.");
            (name, tensor)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let model = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    let r = reference("glm4v");
    check_logits(&model, &r, F32_TOLERANCE * r.scale, "glm4v legacy names");
    assert_eq!(model.load_notes().len(), 1, "{:?}", model.load_notes());
}

#[test]
fn prefill_then_decode_equals_full_recompute() {
    for name in ["glm", "glm4", "chatglm"] {
        let model = load(name, LoadOptions::default());
        let r = reference(name);
        let prompt = &r.prompts[0];
        let (_, decode) = teacher_forced(&model, prompt, &r.greedy[0]);
        let full: Vec<u32> = prompt.iter().chain(&r.greedy[0]).copied().collect();
        let all = model
            .forward_all(&row(&full), &mut model.new_cache())
            .unwrap()
            .squeeze(0)
            .unwrap();
        // Position prompt_len + k holds the logits after feeding greedy token k.
        let recomputed = all.narrow(0, prompt.len(), STEPS).unwrap();
        let diff = max_diff(&recomputed, &decode);
        assert!(
            diff <= 1e-5 * r.scale,
            "{name}: cached vs recomputed differ by {diff}"
        );
        // A prompt split into two prefill chunks gives the same last logits too.
        let mut cache = model.new_cache();
        model.forward(&row(&full[..4]), &mut cache).unwrap();
        let chunked = model.forward(&row(&full[4..]), &mut cache).unwrap();
        let diff = max_diff(
            &chunked.squeeze(0).unwrap(),
            &all.get(full.len() - 1).unwrap(),
        );
        assert!(
            diff <= 1e-5 * r.scale,
            "{name}: chunked prefill differs by {diff}"
        );
        assert_eq!(cache.seq_len(), full.len());
        // Keys and values of every layer: [batch 1, kv heads, tokens, head_dim] each, in f32.
        let c = model.config();
        let per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4;
        assert_eq!(cache.bytes(), full.len() * per_token, "{name}");
    }
}

/// The reference's two (equal-length) prompts prefilled as one batch, then their greedy tokens fed
/// together step by step, give each sequence's single run within `bound`: prefill and every decode step.
fn check_batch(model: &Model, r: &Reference, bound: f32, what: &str) {
    let batch = Tensor::new(
        vec![r.prompts[0].clone(), r.prompts[1].clone()],
        &Device::Cpu,
    )
    .unwrap();
    let mut cache = model.new_cache();
    let prefill = model.forward_all(&batch, &mut cache).unwrap();
    let steps: Vec<Tensor> = (0..r.greedy[0].len())
        .map(|k| {
            let next = Tensor::new(
                vec![vec![r.greedy[0][k]], vec![r.greedy[1][k]]],
                &Device::Cpu,
            )
            .unwrap();
            model.forward(&next, &mut cache).unwrap()
        })
        .collect();
    let steps = Tensor::stack(&steps, 1).unwrap(); // [2, steps, vocab]
    for i in 0..2 {
        let (single_prefill, single_decode) = teacher_forced(model, &r.prompts[i], &r.greedy[i]);
        let p = max_diff(&prefill.get(i).unwrap(), &single_prefill);
        let d = max_diff(&steps.get(i).unwrap(), &single_decode);
        assert!(
            p <= bound && d <= bound,
            "{what} batched, seq {i}: prefill {p}, decode {d}"
        );
    }
}

#[test]
fn batch_of_two_equals_one_at_a_time() {
    for name in ["glm", "glm4v"] {
        let r = reference(name);
        check_batch(
            &load(name, LoadOptions::default()),
            &r,
            1e-5 * r.scale,
            name,
        );
    }
}

/// reference.json of the model directory `dir`.
fn summary(dir: &Path) -> serde_json::Value {
    let path = dir.join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Whether `dir`'s reference records transformers' own f16/bf16 error (dense fixtures and sweep cases).
fn has_half_errors(dir: &Path) -> bool {
    summary(dir)
        .get("transformers_half_precision_max_abs_diff")
        .is_some()
}

/// How far transformers itself lands from its f32 logits in `dtype` ("float16"/"bfloat16"), recorded
/// by the fixture script on the same teacher-forced tokens.
fn transformers_half_error(dir: &Path, dtype: &str) -> f32 {
    summary(dir)["transformers_half_precision_max_abs_diff"][dtype]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: no {dtype} error recorded", dir.display())) as f32
}

/// Teacher-forced on the reference tokens, so the bound is about the arithmetic, not near-ties: the
/// model directory `dir` loaded in f16 and in bf16 keeps its logits within twice the distance
/// transformers' own f16/bf16 run keeps from f32.
fn check_half_dir(dir: &Path) {
    let name = dir.file_name().unwrap().to_string_lossy();
    let r = reference_at(dir);
    for (dtype, torch_name) in [(DType::F16, "float16"), (DType::BF16, "bfloat16")] {
        let model = Model::load(dir, &with_dtype(dtype)).unwrap();
        assert_eq!(model.dtype(), dtype);
        let bound = 2.0 * transformers_half_error(dir, torch_name);
        let worst = check_logits(&model, &r, bound, &format!("{name} {dtype:?}"));
        assert!(
            worst > 1e-4,
            "{name} {dtype:?}: as exact as f32, so not computed in {dtype:?}"
        );
    }
}

#[test]
fn half_precision_stays_close() {
    for name in ["glm", "glm4", "glm4v", "chatglm"] {
        check_half_dir(&fixture(name));
    }
}

#[test]
fn half_precision_attention_scores_stay_f32() {
    // 64-token prompts whose q and k biases put one large term into every attention score: rounded to
    // f16/bf16 before the softmax, the scores lost the differences between keys (f16: 3.5x transformers'
    // own error, over the 2x bound).
    check_f32_fixture("glm4-long-prompt", Architecture::Glm4);
    check_half_dir(&fixture("glm4-long-prompt"));
}

#[test]
fn chatglm_nf4_checkpoints_match_bitsandbytes() {
    // ChatGLM saved in 4 bits by transformers + bitsandbytes: the fused query_key_value is split into q,
    // k and v on its stored codes, for glm-4-9b-chat's [q | k | v] rows and for per-head ones.
    for name in ["chatglm-nf4", "chatglm-mha-nf4"] {
        let model = check_f32_dir(&fixture(name));
        let c = model.config();
        assert_eq!(c.architecture, Architecture::ChatGlm);
        assert_eq!(c.chatglm_grouped_qkv, name == "chatglm-nf4");
        assert!(c.quantization.is_some(), "{name}");
        // Every stored tensor was read (the rotary table aside): nothing of the quant state is left over.
        assert!(
            model.load_notes().is_empty(),
            "{name}: {:?}",
            model.load_notes()
        );
    }
}

#[test]
fn chatglm_nf4_qkv_that_cannot_be_cut_is_refused() {
    // The chatglm fixture with its query_key_value weights stored in 4 bits (double quant): its key rows
    // 128..192 end at element 192 × 128 = 24576, inside a nested group of 64 × 256 absmax codes, so q, k
    // and v cannot be cut out of the stored codes exactly.
    let src = fixture("chatglm");
    let dense =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in &dense {
        let values = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        if name.ends_with("query_key_value.weight") {
            let opts = nf4::QuantOptions::default();
            let packed = nf4::Nf4Tensor::quantize_f32(&values, t.dims(), &opts).unwrap();
            tensors.extend(packed.to_safetensors_tensors(name));
        } else {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let stored = nf4::StoredTensor {
                dtype: nf4::Dtype::F32,
                shape: t.dims().to_vec(),
                data,
            };
            tensors.push((name.clone(), stored));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("model.safetensors");
    nf4::save_file(&weights, tensors).unwrap();
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap()
    };
    let mut config = read("chatglm");
    config["quantization_config"] = read("chatglm-nf4")["quantization_config"].clone();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = Model::load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    for needle in [
        "transformer.encoder.layers.0.self_attention.query_key_value.weight",
        weights.to_str().unwrap(),
        "rows 128..192",
        "element 24576",
        "16384",
        "load the dense checkpoint",
    ] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
}

#[test]
fn nf4_checkpoint_matches_transformers_bitsandbytes() {
    let model = load("glm4-nf4", LoadOptions::default());
    assert!(model.config().quantization.is_some());
    let r = reference("glm4-nf4");
    check_logits(&model, &r, F32_TOLERANCE * r.scale, "glm4-nf4");
    for (i, prompt) in r.prompts.iter().enumerate() {
        assert_eq!(
            greedy(&model, prompt, STEPS),
            r.greedy[i],
            "glm4-nf4: greedy tokens, prompt {i}"
        );
    }
}

#[test]
fn quantize_at_load_matches_bitsandbytes() {
    // The glm4-nf4 fixture is bitsandbytes' quantization of the glm4 fixture: quantizing glm4 at load
    // must give the same model.
    let options = LoadOptions {
        quantize: Some(nf4::QuantOptions::default()),
        ..LoadOptions::default()
    };
    let model = load("glm4", options);
    assert!(model.config().quantization.is_none());
    let r = reference("glm4-nf4");
    check_logits(
        &model,
        &r,
        F32_TOLERANCE * r.scale,
        "glm4 quantized at load",
    );
    assert_eq!(greedy(&model, &r.prompts[0], STEPS), r.greedy[0]);
    // 4-bit weights are held packed.
    let dense = load("glm4", LoadOptions::default());
    assert!(
        model.weight_bytes() * 2 < dense.weight_bytes(),
        "{} vs {}",
        model.weight_bytes(),
        dense.weight_bytes()
    );
    assert_eq!(
        model.weight_bytes(),
        load("glm4-nf4", LoadOptions::default()).weight_bytes()
    );
}

#[test]
fn nf4_in_half_precision_stays_close() {
    for dtype in [DType::F16, DType::BF16] {
        let model = load("glm4-nf4", with_dtype(dtype));
        // The same weights dense in glm4 move this far in transformers: allow twice that.
        let torch_name = if dtype == DType::F16 {
            "float16"
        } else {
            "bfloat16"
        };
        let bound = 2.0 * transformers_half_error(&fixture("glm4"), torch_name);
        check_logits(
            &model,
            &reference("glm4-nf4"),
            bound,
            &format!("glm4-nf4 {dtype:?}"),
        );
    }
}

#[test]
fn nf4_settings_other_than_the_defaults_load_as_stored() {
    // glm4-fp4: FP4 without double quant, the packed bytes stored as bf16 (bnb_4bit_quant_storage),
    // layer 0's mlp left dense and lm_head in 4 bits (llm_int8_skip_modules without lm_head), in_features
    // 96 and 160.
    let model = check_f32_dir(&fixture("glm4-fp4"));
    let quant = model.config().quantization.as_ref().unwrap();
    assert_eq!(quant.bnb_4bit_quant_storage, "bfloat16");
    // The plan (the CLI's first step) takes the stored options rather than refusing bf16 storage.
    let plan = Glm::plan(fixture("glm4-fp4"), &RunOptions::default()).unwrap();
    assert_eq!(plan.choice, Precision::Nf4);
    // Quantizing at load leaves a stored 4-bit checkpoint as it is, its dense mlp included.
    let requantized = load(
        "glm4-fp4",
        LoadOptions {
            quantize: Some(nf4::QuantOptions::default()),
            ..LoadOptions::default()
        },
    );
    assert_eq!(requantized.weight_bytes(), model.weight_bytes());
    let r = reference("glm4-fp4");
    let (ours, _) = teacher_forced(&model, &r.prompts[0], &r.greedy[0]);
    let (again, _) = teacher_forced(&requantized, &r.prompts[0], &r.greedy[0]);
    assert_eq!(max_diff(&ours, &again), 0.0);
}

/// The chatglm fixture rewritten in GlmForCausalLM layout (query_key_value split into q/k/v, names
/// mapped, theta = 10000 × rope_ratio), written to a temporary directory.
fn chatglm_as_glm_layout() -> tempfile::TempDir {
    let src = fixture("chatglm");
    let c = glm::Config::from_model_dir(&src).unwrap();
    let t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert(
        "model.embed_tokens.weight".into(),
        t["transformer.embedding.word_embeddings.weight"].clone(),
    );
    out.insert(
        "model.norm.weight".into(),
        t["transformer.encoder.final_layernorm.weight"].clone(),
    );
    out.insert(
        "lm_head.weight".into(),
        t["transformer.output_layer.weight"].clone(),
    );
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    for i in 0..c.num_hidden_layers {
        let (s, d) = (
            format!("transformer.encoder.layers.{i}."),
            format!("model.layers.{i}."),
        );
        for (from, to) in [
            ("input_layernorm.weight", "input_layernorm.weight"),
            (
                "post_attention_layernorm.weight",
                "post_attention_layernorm.weight",
            ),
            ("self_attention.dense.weight", "self_attn.o_proj.weight"),
            ("mlp.dense_h_to_4h.weight", "mlp.gate_up_proj.weight"),
            ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
        ] {
            out.insert(format!("{d}{to}"), t[&format!("{s}{from}")].clone());
        }
        for kind in ["weight", "bias"] {
            let fused = &t[&format!("{s}self_attention.query_key_value.{kind}")];
            for (p, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
                let part = fused.narrow(0, start, len).unwrap().contiguous().unwrap();
                out.insert(format!("{d}self_attn.{p}_proj.{kind}"), part);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&out, dir.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["GlmForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "partial_rotary_factor": 0.5, "attention_bias": true, "tie_word_embeddings": false,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn chatglm_split_quantizes_like_separate_projections() {
    // Quantizing at load happens after the fused query_key_value is split, so the ChatGLM checkpoint
    // and the same weights in GlmForCausalLM layout must give the same 4-bit model.
    let glm_layout = chatglm_as_glm_layout();
    let options = LoadOptions {
        quantize: Some(nf4::QuantOptions::default()),
        ..LoadOptions::default()
    };
    let chatglm = load("chatglm", options.clone());
    let glm = Model::load(glm_layout.path(), &options).unwrap();
    assert_eq!(chatglm.weight_bytes(), glm.weight_bytes());
    let dense = load("chatglm", LoadOptions::default());
    assert!(chatglm.weight_bytes() * 2 < dense.weight_bytes());
    let r = reference("chatglm");
    let (a_prefill, a_decode) = teacher_forced(&chatglm, &r.prompts[0], &r.greedy[0]);
    let (b_prefill, b_decode) = teacher_forced(&glm, &r.prompts[0], &r.greedy[0]);
    assert_eq!(max_diff(&a_prefill, &b_prefill), 0.0);
    assert_eq!(max_diff(&a_decode, &b_decode), 0.0);
    // And 4 bits really changed the weights.
    let (d_prefill, _) = teacher_forced(&dense, &r.prompts[0], &r.greedy[0]);
    assert!(max_diff(&a_prefill, &d_prefill) > 1e-3);
}
