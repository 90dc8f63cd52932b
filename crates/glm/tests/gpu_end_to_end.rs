//! The decoder on a CUDA device against the same decoder on the CPU: the fixture models and the demo
//! model give the same greedy tokens (f32, f16, NF4 quantized at load and stored in 4 bits) with close
//! logits; out-of-memory cases end in a clear `GlmError::OutOfMemory`; the measured device memory of
//! a streaming 4-bit load stays within the plan plus one tensor.
//!
//! One test binary for every GPU check (each CUDA binary carries ~39 MB of candle's kernels). Without a
//! CUDA device each test prints that it was skipped, unless GLM_REQUIRE_GPU=1 makes that a failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use glm::pipeline::{GenerationSettings, Glm, Prompt, RunOptions};
use glm::plan::{human_bytes, QuantMode};
use glm::sampling::SamplingConfig;
use glm::{GlmError, LoadOptions, Model};
use glm_kernels::cuda_device_or_skip;

mod common;

use common::{fixture, greedy, max_abs, row};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// The two prompts a fixture's reference.safetensors records.
fn fixture_prompts(name: &str) -> Vec<Vec<u32>> {
    let path = fixture(name).join("reference.safetensors");
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    t["prompt_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// Logits of the prompt's positions, then of each of `forced` fed one at a time: [len, vocab] in f32 on
/// the CPU.
fn teacher_forced(model: &Model, prompt: &[u32], forced: &[u32]) -> Tensor {
    let (prefill, steps) = common::teacher_forced(model, prompt, forced);
    Tensor::cat(&[prefill, steps], 0)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

mod tokens {
    use super::*;

    const STEPS: usize = 32;

    /// Loads `name` on the CPU and on `gpu` with `options`, and checks that both give the same greedy
    /// tokens for the fixture's prompts and logits within `tolerance` × the largest logit.
    fn check_fixture(gpu: &Device, name: &str, options: &LoadOptions, tolerance: f32) {
        let cpu_model = Model::load(fixture(name), options).unwrap();
        let gpu_options = LoadOptions {
            device: gpu.clone(),
            kv_capacity: Some(64),
            ..options.clone()
        };
        let gpu_model = Model::load(fixture(name), &gpu_options)
            .unwrap_or_else(|e| panic!("{name} on the GPU: {e}"));
        assert!(gpu_model.device().is_cuda());
        let what = format!(
            "{name} {:?} quantize={}",
            options.dtype,
            options.quantize.is_some()
        );
        let mut worst = 0.0f32;
        for (i, prompt) in fixture_prompts(name).iter().enumerate() {
            let on_cpu = greedy(&cpu_model, prompt, STEPS);
            let on_gpu = greedy(&gpu_model, prompt, STEPS);
            assert_eq!(on_gpu, on_cpu, "{what}: greedy tokens of prompt {i}");
            let want = teacher_forced(&cpu_model, prompt, &on_cpu);
            let got = teacher_forced(&gpu_model, prompt, &on_cpu);
            let scale = max_abs(&want);
            let diff = max_abs(&(got - &want).unwrap()) / scale;
            assert!(
                diff <= tolerance,
                "{what}: prompt {i}: max |GPU - CPU| logit {diff:.2e} × the largest, above {tolerance:.0e}"
            );
            worst = worst.max(diff);
        }
        println!(
            "{what}: same {STEPS} greedy tokens; max logit difference {worst:.2e} × the largest"
        );
    }

    fn options(dtype: DType, quantize: bool) -> LoadOptions {
        LoadOptions {
            dtype,
            quantize: quantize.then(nf4::QuantOptions::default),
            ..LoadOptions::default()
        }
    }

    #[test]
    fn fixtures_in_f32_match_the_cpu() {
        let Some(gpu) = cuda_device_or_skip("fixtures_in_f32_match_the_cpu") else {
            return;
        };
        for name in ["glm", "glm4", "glm4v", "chatglm"] {
            check_fixture(&gpu, name, &options(DType::F32, false), 1e-4);
        }
    }

    #[test]
    fn fixtures_in_f16_match_the_cpu() {
        let Some(gpu) = cuda_device_or_skip("fixtures_in_f16_match_the_cpu") else {
            return;
        };
        for name in ["glm", "glm4"] {
            check_fixture(&gpu, name, &options(DType::F16, false), 5e-3);
        }
    }

    #[test]
    fn nf4_fixtures_match_the_cpu() {
        let Some(gpu) = cuda_device_or_skip("nf4_fixtures_match_the_cpu") else {
            return;
        };
        // Quantized at load (on the GPU by our kernel, on the CPU by the nf4 crate: the same codes)...
        for name in ["glm", "glm4", "chatglm"] {
            check_fixture(&gpu, name, &options(DType::F32, true), 1e-4);
        }
        check_fixture(&gpu, "glm4", &options(DType::F16, true), 5e-3);
        // ... and stored in 4 bits by bitsandbytes, uploaded as stored (ChatGLM's fused q/k/v cut into
        // three 4-bit weights on the host first).
        for name in ["glm4-nf4", "chatglm-nf4", "chatglm-mha-nf4"] {
            check_fixture(&gpu, name, &options(DType::F32, false), 1e-4);
        }
        // fp4 has no CUDA kernel: a clear refusal naming it, not a wrong answer.
        let on_gpu = LoadOptions {
            device: gpu.clone(),
            ..options(DType::F32, false)
        };
        let Err(error) = Model::load(fixture("glm4-fp4"), &on_gpu) else {
            panic!("an fp4 checkpoint on the GPU must be refused");
        };
        assert!(error.to_string().contains("fp4"), "{error}");
        // The minimum-memory options: a 4-bit lm_head (here a tied one) and the table in host memory.
        let lean = LoadOptions {
            quantize_lm_head: true,
            embeddings_on_host: true,
            ..options(DType::F32, true)
        };
        check_fixture(&gpu, "glm4", &lean, 1e-4);
    }

    /// bf16 keeps 8 bits of mantissa, so CPU and GPU (different accumulation orders) may part at near
    /// ties; what must hold is that the GPU's bf16 is as close to the f32 model as the CPU's bf16, which
    /// the CPU tests check against transformers.
    #[test]
    fn fixtures_in_bf16_are_as_close_to_f32_as_the_cpus_bf16() {
        let Some(gpu) =
            cuda_device_or_skip("fixtures_in_bf16_are_as_close_to_f32_as_the_cpus_bf16")
        else {
            return;
        };
        for (name, quantize) in [
            ("glm", false),
            ("glm4", false),
            ("glm4", true),
            ("chatglm", true),
        ] {
            let reference = Model::load(fixture(name), &options(DType::F32, quantize)).unwrap();
            let cpu = Model::load(fixture(name), &options(DType::BF16, quantize)).unwrap();
            let gpu_options = LoadOptions {
                device: gpu.clone(),
                kv_capacity: Some(64),
                ..options(DType::BF16, quantize)
            };
            let on_gpu = Model::load(fixture(name), &gpu_options).unwrap();
            for (i, prompt) in fixture_prompts(name).iter().enumerate() {
                let forced = greedy(&reference, prompt, STEPS);
                let want = teacher_forced(&reference, prompt, &forced);
                let scale = max_abs(&want);
                let error = |model: &Model| {
                    max_abs(&(teacher_forced(model, prompt, &forced) - &want).unwrap()) / scale
                };
                let (cpu_error, gpu_error) = (error(&cpu), error(&on_gpu));
                println!(
                    "{name} bf16 quantize={quantize} prompt {i}: max logit error vs f32 \
                     {gpu_error:.2e} on the GPU, {cpu_error:.2e} on the CPU (× the largest)"
                );
                assert!(
                    gpu_error <= 2.0 * cpu_error + 1e-3,
                    "{name} bf16 quantize={quantize} prompt {i}: GPU error {gpu_error:.2e} is far \
                     above the CPU's {cpu_error:.2e}"
                );
            }
        }
    }

    /// The demo model through the library's front door, as `glm-run --device cuda` runs it.
    #[test]
    fn demo_model_generates_the_cpus_text() {
        let Some(gpu) = cuda_device_or_skip("demo_model_generates_the_cpus_text") else {
            return;
        };
        let settings = GenerationSettings {
            sampling: SamplingConfig::greedy(),
            max_new_tokens: 48,
            ..GenerationSettings::default()
        };
        let prompt = Prompt::chat(None, "What say you to my love?");
        for (dtype, quant, lean) in [
            (DType::F16, QuantMode::None, false),
            (DType::F32, QuantMode::Nf4, false),
            (DType::F16, QuantMode::Nf4, false),
            (DType::F16, QuantMode::Nf4, true),
        ] {
            let options = RunOptions {
                dtype,
                quant,
                quantize_lm_head: lean,
                embeddings_on_host: lean,
                ..RunOptions::default()
            };
            let on_cpu = Glm::load(demo(), &options).unwrap();
            let want = on_cpu.generate(&prompt, &settings, |_| {}).unwrap();
            let gpu_options = RunOptions {
                device: gpu.clone(),
                ..options
            };
            let on_gpu = Glm::load(demo(), &gpu_options).unwrap();
            let mut streamed = String::new();
            let got = on_gpu
                .generate(&prompt, &settings, |piece| streamed.push_str(piece))
                .unwrap();
            let what = format!("demo {dtype:?} {quant:?} lean={lean}");
            assert_eq!(got.tokens, want.tokens, "{what}");
            assert_eq!(got.text, want.text, "{what}");
            assert_eq!(streamed, got.text, "{what}");
            // The weights held on the device are what the plan counted (4-bit sizes to within the
            // few bytes of state the kernels keep differently).
            let plan = on_gpu.plan_used();
            let held = on_gpu.model().weight_bytes() as f64;
            let planned = plan.chosen().weights() as f64;
            assert!(
                (held - planned).abs() <= planned * 0.01,
                "{what}: {held} bytes of weights on the device, planned {planned}"
            );
            let measured = on_gpu.measured_memory().expect("driver figures on CUDA");
            println!(
                "{what}: {:?}; {:.0} tok/s decode; weights {} (planned {}); measured after load {}, \
                 peak {}",
                got.text,
                got.timings.decode_tok_s,
                human_bytes(held as u64),
                human_bytes(planned as u64),
                human_bytes(measured.after_load),
                human_bytes(measured.peak)
            );
        }
    }
}

mod out_of_memory {
    use super::*;

    fn on(gpu: &Device) -> RunOptions {
        RunOptions {
            device: gpu.clone(),
            dtype: DType::F16,
            ..RunOptions::default()
        }
    }

    fn expect_out_of_memory(result: glm::Result<Glm>) -> String {
        match result {
            Err(GlmError::OutOfMemory(message)) => message,
            Err(other) => panic!("expected an out-of-memory error, got: {other}"),
            Ok(_) => panic!("expected an out-of-memory error, but the model loaded"),
        }
    }

    #[test]
    fn a_memory_limit_too_small_is_a_clear_error() {
        let Some(gpu) = cuda_device_or_skip("a_memory_limit_too_small_is_a_clear_error") else {
            return;
        };
        let plan = Glm::plan(demo(), &on(&gpu)).unwrap();
        // The driver's free memory is the budget on CUDA.
        let budget = plan.budget.as_ref().expect("a budget from the driver");
        assert!(budget.source.contains("CUDA device 0"), "{}", budget.source);

        // Room for 4 bits only (the safety margin is 10%), dense asked for: the error says 4 bits
        // would fit.
        let limit = (plan.nf4.total() as f64 / 0.9) as u64 + 1024;
        assert!(plan.dense.total() as f64 > limit as f64 * 0.9);
        let dense = RunOptions {
            quant: QuantMode::None,
            memory_limit: Some(limit),
            ..on(&gpu)
        };
        let message = expect_out_of_memory(Glm::load(demo(), &dense));
        assert!(
            message.contains("missing") && message.contains("--quant 4bit (needs"),
            "{message}"
        );
        // Auto picks 4 bits under the same limit and loads.
        let auto = RunOptions {
            memory_limit: Some(limit),
            ..on(&gpu)
        };
        let glm = Glm::load(demo(), &auto).unwrap();
        assert_eq!(glm.plan_used().choice, glm::plan::Precision::Nf4);

        // Nothing fits in 1 MiB.
        let tiny = RunOptions {
            memory_limit: Some(1 << 20),
            ..on(&gpu)
        };
        let message = expect_out_of_memory(Glm::load(demo(), &tiny));
        assert!(
            message.contains("nothing fits") && message.contains("1.0 MiB"),
            "{message}"
        );
        println!("1 MiB: {message}");
    }

    #[test]
    fn a_context_too_long_for_the_device_names_one_that_fits() {
        let Some(gpu) =
            cuda_device_or_skip("a_context_too_long_for_the_device_names_one_that_fits")
        else {
            return;
        };
        // 8 layers × 2 × 2 kv heads × 64 × 2 bytes = 4 KiB of KV cache per token: 2^26 tokens are 256 GiB.
        let options = RunOptions {
            context_len: Some(1 << 26),
            quant: QuantMode::Nf4,
            ..on(&gpu)
        };
        let message = expect_out_of_memory(Glm::load(demo(), &options));
        assert!(message.contains("--context "), "{message}");
        println!("context 2^26: {message}");
    }

    #[test]
    fn a_failed_device_allocation_is_reported_not_aborted() {
        let Some(gpu) = cuda_device_or_skip("a_failed_device_allocation_is_reported_not_aborted")
        else {
            return;
        };
        // Past the planner: a KV cache of 2^28 tokens (2 kv heads × 48 × f32 = 384 bytes per token and
        // layer, 96 GiB for the keys of one layer) is more than the device has.
        let options = LoadOptions {
            device: gpu.clone(),
            kv_capacity: Some(1 << 28),
            ..LoadOptions::default()
        };
        let model = Model::load(fixture("glm4"), &options).unwrap();
        let prompt = &fixture_prompts("glm4")[0];
        let mut cache = model.new_cache();
        let err = model.forward(&row(prompt), &mut cache).unwrap_err();
        let GlmError::OutOfMemory(message) = &err else {
            panic!("expected an out-of-memory error, got: {err}");
        };
        assert!(
            message.contains("ran out of memory") && message.contains("free of"),
            "{message}"
        );
        assert_eq!(
            cache.seq_len(),
            0,
            "the failed step must leave the cache empty"
        );
        println!("KV cache of 2^28 tokens: {message}");
        // The device is still usable: a cache that fits runs the same model.
        let fits = LoadOptions {
            kv_capacity: Some(64),
            ..options
        };
        let model = Model::load(fixture("glm4"), &fits).unwrap();
        assert_eq!(greedy(&model, prompt, 4).len(), 4);
    }
}

mod memory {
    use super::*;

    /// A dense checkpoint quantized while it streams onto the device: the measured peak stays within
    /// the plan plus one full-precision tensor, and above what is held at the end by no more than
    /// about one tensor (in its stored and its converted form).
    #[test]
    fn a_streaming_nf4_load_peaks_within_the_plan_plus_one_tensor() {
        let Some(gpu) =
            cuda_device_or_skip("a_streaming_nf4_load_peaks_within_the_plan_plus_one_tensor")
        else {
            return;
        };
        let options = RunOptions {
            device: gpu.clone(),
            dtype: DType::F16,
            quant: QuantMode::Nf4,
            ..RunOptions::default()
        };
        let glm = Glm::load(demo(), &options).unwrap();
        let plan = glm.plan_used();
        let c = glm.model().config();
        // The largest weight as stored (f16): the lm_head or the fused gate_up projection.
        let largest = (c.vocab_size.max(2 * c.intermediate_size) * c.hidden_size * 2) as u64;
        let m = glm.measured_memory().expect("driver figures on CUDA");
        println!(
            "demo NF4 load: planned {} ({} weights), largest tensor {}; measured after load {}, \
             peak while loading {}",
            human_bytes(plan.chosen().total()),
            human_bytes(plan.chosen().weights()),
            human_bytes(largest),
            human_bytes(m.after_load),
            human_bytes(m.peak_load)
        );
        assert!(m.after_load > 0 && m.peak_load >= m.after_load, "{m:?}");
        assert!(
            m.peak_load <= plan.chosen().total() + largest,
            "peak {} above the plan {} + one tensor {largest}",
            m.peak_load,
            plan.chosen().total()
        );
        // Allocations are rounded up to 2 MiB pages: allow a few.
        assert!(
            m.peak_load <= m.after_load + 2 * largest + (8 << 20),
            "peak while loading {} vs {} held after: more than one tensor in flight",
            m.peak_load,
            m.after_load
        );
    }
}

/// The fused decode step (CudaDecoder), launched kernel by kernel and as a CUDA graph, against the plain
/// op-by-op decoder: the same greedy tokens, and bit-identical logits between the two fused modes.
mod decode_step {
    use super::*;
    use glm::sampling::{Sampler, StopCondition};
    use glm::{generate_with, CudaDecoder, DecodeMode, StepLaunch};

    const STEPS: usize = 24;

    fn tokens_in(
        model: &Model,
        prompt: &[u32],
        mode: DecodeMode,
        sampling: SamplingConfig,
    ) -> Vec<u32> {
        let mut sampler = Sampler::new(sampling).unwrap();
        let stop = StopCondition::new(Vec::<u32>::new(), STEPS).unwrap();
        generate_with(model, prompt, &mut sampler, &stop, mode, |_| {})
            .unwrap()
            .tokens
    }

    fn gpu_options(gpu: &Device, dtype: DType, quantize: bool, lean: bool) -> LoadOptions {
        LoadOptions {
            device: gpu.clone(),
            dtype,
            quantize: quantize.then(nf4::QuantOptions::default),
            quantize_lm_head: lean,
            embeddings_on_host: lean,
            kv_capacity: Some(64),
            ..LoadOptions::default()
        }
    }

    #[test]
    fn fused_and_graph_decode_give_the_plain_decoders_tokens() {
        let Some(gpu) =
            cuda_device_or_skip("fused_and_graph_decode_give_the_plain_decoders_tokens")
        else {
            return;
        };
        let sampled = SamplingConfig {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            repetition_penalty: 1.1,
            seed: 7,
        };
        for (name, dtype, quantize, lean) in [
            ("glm", DType::F32, false, false),
            ("glm4", DType::F32, false, false),
            ("glm4v", DType::F32, false, false),
            ("chatglm", DType::F32, false, false),
            ("glm4", DType::F16, false, false),
            ("glm4", DType::BF16, false, false),
            ("glm", DType::F32, true, false),
            ("glm4", DType::F16, true, false),
            ("chatglm", DType::BF16, true, false),
            ("glm4-nf4", DType::F16, false, false),
            ("glm4", DType::F32, true, true),
            // Config styles the differential sweep against transformers found (odd rotary dims, MQA,
            // widths the tiled GEMV does not take, ChatGLM's default keys).
            ("glm4-rotary", DType::F32, false, false),
            ("glm4-rotary", DType::F16, true, false),
            ("glm4v-head-dim", DType::BF16, false, false),
            ("chatglm-defaults", DType::F16, true, false),
            ("chatglm-nf4", DType::F16, false, false),
        ] {
            let model =
                Model::load(fixture(name), &gpu_options(&gpu, dtype, quantize, lean)).unwrap();
            let what = format!("{name} {dtype:?} quantize={quantize} lean={lean}");
            CudaDecoder::new(&model, 1, StepLaunch::Graph)
                .unwrap_or_else(|e| panic!("{what}: the fused step should cover it: {e}"));
            for (i, prompt) in fixture_prompts(name).iter().enumerate() {
                let plain = tokens_in(&model, prompt, DecodeMode::Plain, SamplingConfig::greedy());
                for mode in [DecodeMode::Fused, DecodeMode::Graph] {
                    let got = tokens_in(&model, prompt, mode, SamplingConfig::greedy());
                    assert_eq!(
                        got, plain,
                        "{what}: prompt {i}: greedy tokens, {mode:?} vs plain"
                    );
                }
                // Sampling on the device (with and without the repetition penalty's seen mask) and, for greedy
                // decoding with a penalty, on the host from the step's logits; f32 only: the draws must not sit
                // on a rounding difference.
                if dtype == DType::F32 {
                    let unpenalized = SamplingConfig {
                        repetition_penalty: 1.0,
                        ..sampled.clone()
                    };
                    let penalized_greedy = SamplingConfig {
                        repetition_penalty: 1.3,
                        ..SamplingConfig::greedy()
                    };
                    for config in [&sampled, &unpenalized, &penalized_greedy] {
                        let plain = tokens_in(&model, prompt, DecodeMode::Plain, config.clone());
                        let got = tokens_in(&model, prompt, DecodeMode::Graph, config.clone());
                        assert_eq!(got, plain, "{what}: prompt {i}: {config:?}, graph vs plain");
                    }
                }
            }
            println!("{what}: plain, fused and graph decode give the same tokens");
        }
    }

    /// Logits of `steps` decode steps after a prefill of `prompts` (one row per sequence), feeding
    /// `forced` tokens; [steps, batch, vocab] on the host.
    fn fused_logits(
        model: &Model,
        prompts: &Tensor,
        forced: &[Vec<u32>],
        launch: StepLaunch,
        fused_norms: bool,
    ) -> Vec<Tensor> {
        let mut cache = model.new_cache();
        model.forward(prompts, &mut cache).unwrap();
        let mut step = CudaDecoder::new(model, prompts.dim(0).unwrap(), launch).unwrap();
        step.set_fused_norms(fused_norms);
        forced
            .iter()
            .map(|tokens| {
                step.set_tokens(&cache, tokens).unwrap();
                step.step(&mut cache).unwrap();
                step.logits().unwrap()
            })
            .collect()
    }

    #[test]
    fn graph_replays_are_bit_identical_to_direct_launches_for_a_batch() {
        let Some(gpu) =
            cuda_device_or_skip("graph_replays_are_bit_identical_to_direct_launches_for_a_batch")
        else {
            return;
        };
        for (dtype, quantize, tolerance) in [(DType::F32, false, 1e-5), (DType::F16, true, 5e-3)] {
            let model =
                Model::load(fixture("glm4"), &gpu_options(&gpu, dtype, quantize, false)).unwrap();
            let prompts = fixture_prompts("glm4");
            let len = prompts.iter().map(Vec::len).min().unwrap();
            let rows: Vec<Vec<u32>> = prompts.iter().map(|p| p[..len].to_vec()).collect();
            let batch = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
            let forced: Vec<Vec<u32>> = (0..6u32)
                .map(|i| vec![i * 37 % 300, i * 11 % 300])
                .collect();
            let direct = fused_logits(&model, &batch, &forced, StepLaunch::Direct, false);
            let graph = fused_logits(&model, &batch, &forced, StepLaunch::Graph, false);
            for (i, (d, g)) in direct.iter().zip(&graph).enumerate() {
                let (d, g) = (d.to_vec2::<f32>().unwrap(), g.to_vec2::<f32>().unwrap());
                assert!(
                    d == g,
                    "{dtype:?}: step {i}: graph logits differ from direct launches"
                );
            }
            // And each row of the batch matches the plain decoder run on that sequence alone.
            for (r, prompt) in rows.iter().enumerate() {
                let mut cache = model.new_cache();
                model.forward(&row(prompt), &mut cache).unwrap();
                for (i, tokens) in forced.iter().enumerate() {
                    let want = model.forward(&row(&tokens[r..r + 1]), &mut cache).unwrap();
                    let got = graph[i].get(r).unwrap().unsqueeze(0).unwrap();
                    let diff = max_abs(&(got - &want.to_device(&Device::Cpu).unwrap()).unwrap())
                        / max_abs(&want);
                    assert!(diff <= tolerance, "{dtype:?}: row {r} step {i}: {diff:.2e}");
                }
            }
            println!(
                "{dtype:?} quantize={quantize}: graph = direct bit for bit; batch rows match plain"
            );
        }
    }

    /// The projections that compute the norm before them (set_fused_norms) against the norm kernels: logits
    /// within rounding on every layout (GLM-4-0414's sublayer norms too), dense and
    /// NF4, in each dtype (f32 takes the norm kernel either way); graph = direct bit for bit, for a batch.
    #[test]
    fn fused_norms_match_the_norm_kernels() {
        let Some(gpu) = cuda_device_or_skip("fused_norms_match_the_norm_kernels") else {
            return;
        };
        for (name, dtype, quantize, tolerance) in [
            ("glm", DType::F32, false, 1e-5),
            ("glm4", DType::F16, true, 5e-3),
            ("glm4", DType::BF16, false, 2e-2),
            ("glm4v", DType::F16, false, 5e-3),
            ("chatglm", DType::BF16, true, 2e-2),
            ("glm4-nf4", DType::F16, false, 5e-3),
            ("glm4-rotary", DType::F16, true, 5e-3),
            ("chatglm-defaults", DType::BF16, false, 2e-2),
        ] {
            let what = format!("{name} {dtype:?} quantize={quantize}");
            let model =
                Model::load(fixture(name), &gpu_options(&gpu, dtype, quantize, false)).unwrap();
            let prompts = fixture_prompts(name);
            let len = prompts.iter().map(Vec::len).min().unwrap();
            let rows: Vec<Vec<u32>> = prompts.iter().map(|p| p[..len].to_vec()).collect();
            let batch = Tensor::new(rows, &Device::Cpu).unwrap();
            let forced: Vec<Vec<u32>> = (0..6u32)
                .map(|i| vec![i * 37 % 300, i * 11 % 300])
                .collect();
            let kernels = fused_logits(&model, &batch, &forced, StepLaunch::Graph, false);
            let direct = fused_logits(&model, &batch, &forced, StepLaunch::Direct, true);
            let graph = fused_logits(&model, &batch, &forced, StepLaunch::Graph, true);
            for (i, ((k, d), g)) in kernels.iter().zip(&direct).zip(&graph).enumerate() {
                let (dv, gv) = (d.to_vec2::<f32>().unwrap(), g.to_vec2::<f32>().unwrap());
                assert!(
                    dv == gv,
                    "{what}: step {i}: graph logits differ from direct launches"
                );
                let diff = max_abs(&(d - k).unwrap()) / max_abs(k);
                assert!(
                    diff <= tolerance,
                    "{what}: step {i}: {diff:.2e} from the norm kernels"
                );
            }
            println!("{what}: fused norms match the norm kernels; graph = direct bit for bit");
        }
    }
}
