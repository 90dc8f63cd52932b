//! config.json of each layout normalized into one Config, and bad model directories turned into clear
//! errors that name the file (and tensor) at fault.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use glm::sampling::{Sampler, SamplingConfig, StopCondition};
use glm::{generate, Architecture, Checkpoint, Config, GlmError, LoadOptions, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> GlmError {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// Rewrites model.safetensors through `edit` of its f32 tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn configs_of_every_layout_normalize() {
    // glm-4-9b-chat-hf style: rope keys and torch_dtype at top level.
    let glm = Config::from_model_dir(fixture("glm")).unwrap();
    assert_eq!(glm.architecture, Architecture::Glm);
    assert_eq!(
        (
            glm.hidden_size,
            glm.num_hidden_layers,
            glm.num_attention_heads
        ),
        (128, 2, 4)
    );
    assert_eq!(
        (glm.num_key_value_heads, glm.head_dim, glm.rotary_dim()),
        (2, 32, 16)
    );
    assert_eq!((glm.rope_theta, glm.partial_rotary_factor), (10000.0, 0.5));
    assert_eq!(glm.torch_dtype, Some(DType::BF16));
    assert!(!glm.tie_word_embeddings && glm.attention_bias);
    assert_eq!(glm.eos_token_ids, [310, 311, 312]);

    // transformers 5 style: rope_parameters, dtype; tied; head_dim ≠ hidden / heads.
    let glm4 = Config::from_model_dir(fixture("glm4")).unwrap();
    assert_eq!(glm4.architecture, Architecture::Glm4);
    assert_eq!(
        (glm4.head_dim, glm4.rotary_dim(), glm4.rms_norm_eps),
        (48, 24, 1e-5)
    );
    assert!(glm4.tie_word_embeddings);
    assert!(glm4.quantization.is_none());

    // GLM-4.1V: the decoder's keys under text_config, rope_scaling with mrope_section.
    let glm4v = Config::from_model_dir(fixture("glm4v")).unwrap();
    assert_eq!(glm4v.architecture, Architecture::Glm4v);
    assert_eq!(
        (glm4v.vocab_size, glm4v.head_dim, glm4v.rotary_dim()),
        (320, 32, 16)
    );

    // ChatGLM names; theta = 10000 × rope_ratio; eos merged from generation_config.json.
    let chatglm = Config::from_model_dir(fixture("chatglm")).unwrap();
    assert_eq!(chatglm.architecture, Architecture::ChatGlm);
    assert_eq!((chatglm.vocab_size, chatglm.intermediate_size), (320, 256));
    assert_eq!((chatglm.num_key_value_heads, chatglm.head_dim), (2, 32));
    assert_eq!(
        (chatglm.rope_theta, chatglm.rms_norm_eps),
        (20000.0, 1.5625e-7)
    );
    assert!(chatglm.attention_bias && chatglm.chatglm_grouped_qkv);
    assert_eq!(chatglm.eos_token_ids, [310, 311, 312]);

    let nf4 = Config::from_model_dir(fixture("glm4-nf4")).unwrap();
    assert!(nf4.quantization.is_some());
}

#[test]
fn rope_keys_are_found_at_top_level_or_nested() {
    let path = Path::new("config.json");
    let base = r#""architectures": ["Glm4ForCausalLM"], "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16"#;
    let top = Config::from_json(
        &format!(r#"{{{base}, "rope_theta": 500.0, "partial_rotary_factor": 0.25}}"#),
        path,
    )
    .unwrap();
    let nested = Config::from_json(
        &format!(
            r#"{{{base}, "rope_parameters": {{"rope_type": "default", "rope_theta": 500.0,
            "partial_rotary_factor": 0.25}}}}"#
        ),
        path,
    )
    .unwrap();
    assert_eq!(top, nested);
    assert_eq!((top.rope_theta, top.rotary_dim()), (500.0, 4));
    // Both: transformers 5 takes the nested values (it writes a stale top-level partial_rotary_factor of
    // 0.5 itself), and rope_scaling over rope_parameters.
    let both = Config::from_json(
        &format!(
            r#"{{{base}, "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_parameters":
            {{"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}}}"#
        ),
        path,
    )
    .unwrap();
    assert_eq!(both, nested);
    let scaling = Config::from_json(
        &format!(
            r#"{{{base}, "rope_parameters": {{"rope_type": "default", "rope_theta": 10000.0}},
            "rope_scaling": {{"type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}}}"#
        ),
        path,
    )
    .unwrap();
    assert_eq!(scaling, nested);
    // Absent: transformers' GlmConfig/Glm4Config defaults.
    let default = Config::from_json(&format!("{{{base}}}"), path).unwrap();
    assert_eq!(
        (default.rope_theta, default.partial_rotary_factor),
        (10000.0, 0.5)
    );
    // One eos id or a list.
    let one = Config::from_json(&format!(r#"{{{base}, "eos_token_id": 7}}"#), path).unwrap();
    assert_eq!(one.eos_token_ids, [7]);
    // Scaled rope variants are not silently run as plain rope.
    let err = Config::from_json(
        &format!(r#"{{{base}, "rope_parameters": {{"rope_type": "yarn", "factor": 4.0}}}}"#),
        path,
    )
    .unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
}

#[test]
fn defaults_and_rotary_dims_follow_transformers() {
    // int(20 × 0.25) = 5: three inverse frequencies, six dimensions rotated.
    let glm4 = Config::from_model_dir(fixture("glm4-rotary")).unwrap();
    assert_eq!(
        (glm4.partial_rotary_factor, glm4.rope_dim, glm4.rotary_dim()),
        (0.25, 5, 6)
    );
    // GLM-4.1V: heads of hidden_size / num_attention_heads, rotary sized by the head_dim key;
    // num_key_value_heads left out is Glm4vTextConfig's 2, an explicit null num_attention_heads.
    let glm4v = Config::from_model_dir(fixture("glm4v-head-dim")).unwrap();
    assert_eq!(
        (glm4v.head_dim, glm4v.rope_dim, glm4v.num_key_value_heads),
        (16, 6, 2)
    );
    let dir = copy_fixture("glm4v-head-dim");
    edit_config(dir.path(), |c| {
        c["text_config"]["num_key_value_heads"] = serde_json::Value::Null
    });
    let null_kv = Config::from_model_dir(dir.path()).unwrap();
    assert_eq!(null_kv.num_key_value_heads, null_kv.num_attention_heads);
    // ChatGLMConfig's defaults: kv_channels 128, multi_query_group_num 1; rotary on half of each head.
    let chatglm = Config::from_model_dir(fixture("chatglm-defaults")).unwrap();
    assert_eq!(
        (
            chatglm.head_dim,
            chatglm.num_key_value_heads,
            chatglm.rope_dim
        ),
        (128, 1, 64)
    );
    assert_eq!(chatglm.rope_theta, 10000.0 * 500.0);
}

#[test]
fn unknown_architecture_names_config_json() {
    let dir = copy_fixture("glm");
    edit_config(dir.path(), |c| {
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"])
    });
    let err = load_err(dir.path());
    assert!(
        matches!(err, GlmError::UnknownArchitecture { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("LlamaForCausalLM"),
        "{msg}"
    );
    assert!(
        msg.contains("GlmForCausalLM"),
        "should list what is supported: {msg}"
    );
}

#[test]
fn bad_config_values_are_named() {
    let dir = copy_fixture("glm4");
    edit_config(dir.path(), |c| {
        c["num_key_value_heads"] = serde_json::json!(3)
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("num_key_value_heads"),
        "{msg}"
    );

    let dir = copy_fixture("chatglm");
    edit_config(dir.path(), |c| c["rmsnorm"] = serde_json::json!(false));
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("rmsnorm"), "{msg}");

    let dir = copy_fixture("glm");
    fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("not valid JSON"),
        "{msg}"
    );

    let dir = copy_fixture("glm");
    fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let dir = copy_fixture("glm4");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    });
    let err = load_err(dir.path());
    assert!(matches!(err, GlmError::MissingTensor { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.1.mlp.down_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("glm4");
    edit_weights(dir.path(), |t| {
        let w = Tensor::zeros((96, 127), DType::BF16, &Device::Cpu).unwrap();
        t.insert("model.layers.0.self_attn.k_proj.weight".into(), w);
    });
    let err = load_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, GlmError::ShapeMismatch { .. }), "{err:?}");
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[96, 127]") && msg.contains("[96, 128]"),
        "{msg}"
    );

    // A ChatGLM fused query_key_value with the wrong row count.
    let dir = copy_fixture("chatglm");
    edit_weights(dir.path(), |t| {
        let w = Tensor::zeros((200, 128), DType::BF16, &Device::Cpu).unwrap();
        t.insert(
            "transformer.encoder.layers.0.self_attention.query_key_value.weight".into(),
            w,
        );
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("query_key_value.weight") && msg.contains("[256, 128]"),
        "{msg}"
    );
}

#[test]
fn non_float_weight_dtype_is_refused() {
    let dir = copy_fixture("glm4");
    edit_weights(dir.path(), |t| {
        let w = Tensor::zeros(128, DType::U32, &Device::Cpu).unwrap();
        t.insert("model.norm.weight".into(), w);
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("U32"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors_names_the_file() {
    // Truncated: the header promises more data than the file has.
    let dir = copy_fixture("glm4");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, GlmError::Safetensors { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    // Garbage header.
    fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00not a json hdr!!").unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, GlmError::Safetensors { .. }), "{err:?}");

    // Empty file.
    fs::write(&path, b"").unwrap();
    assert!(matches!(load_err(dir.path()), GlmError::Safetensors { .. }));
}

#[test]
fn shard_problems_are_named() {
    // A shard the index names is gone.
    let dir = copy_fixture("glm");
    fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, GlmError::MissingShard { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("index.json"),
        "{msg}"
    );

    // The index lists a tensor its shard does not hold.
    let dir = copy_fixture("glm");
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.extra.weight"] =
        serde_json::json!("model-00001-of-00002.safetensors");
    fs::write(&index_path, index.to_string()).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.extra.weight") && msg.contains("model-00001-of-00002"),
        "{msg}"
    );

    // No checkpoint at all.
    let dir = tempfile::tempdir().unwrap();
    fs::copy(
        fixture("glm").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, GlmError::NoCheckpoint { .. }), "{err:?}");
}

#[test]
fn nf4_weight_without_quant_state_is_named() {
    let dir = copy_fixture("glm4-nf4");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4");
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.q_proj.weight") && msg.contains("quant_state"),
        "{msg}"
    );

    let dir = copy_fixture("glm4-nf4");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight.absmax");
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.layers.1.mlp.down_proj.weight.absmax"),
        "{msg}"
    );

    // FP4 codes stored as bf16 (bnb_4bit_quant_storage) are recognised as packed too.
    let dir = copy_fixture("glm4-fp4");
    edit_weights(dir.path(), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__fp4");
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__fp4"),
        "{msg}"
    );
}

#[test]
fn quantization_we_cannot_run_is_refused_naming_config_json() {
    // Refused when config.json is read, before any weight, naming the file and the setting.
    let cases: [(&str, serde_json::Value); 3] = [
        (
            "load_in_4bit",
            serde_json::json!({"load_in_4bit": false, "load_in_8bit": true}),
        ),
        (
            "quant_method \"gptq\"",
            serde_json::json!({"quant_method": "gptq"}),
        ),
        (
            "bnb_4bit_quant_storage \"int4\"",
            serde_json::json!({"bnb_4bit_quant_storage": "int4"}),
        ),
    ];
    for (setting, change) in cases {
        let dir = copy_fixture("glm4-nf4");
        edit_config(dir.path(), |c| {
            for (key, value) in change.as_object().unwrap() {
                c["quantization_config"][key] = value.clone();
            }
        });
        let msg = load_err(dir.path()).to_string();
        assert!(
            msg.contains("config.json") && msg.contains(setting),
            "{msg}"
        );
    }
}

#[test]
fn checkpoint_maps_without_loading() {
    let ckpt = Checkpoint::open(fixture("glm")).unwrap();
    assert!(ckpt.contains("lm_head.weight"));
    let file = ckpt.file_of("model.embed_tokens.weight").unwrap();
    assert!(
        file.to_string_lossy().contains("-of-00002"),
        "{}",
        file.display()
    );
    let view = ckpt.view("model.norm.weight").unwrap();
    assert_eq!(view.shape(), [128]);
    let err = ckpt.view("model.nope").unwrap_err().to_string();
    assert!(
        err.contains("model.nope") && err.contains("shards"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let model = Model::load(fixture("glm4"), &LoadOptions::default()).unwrap();
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    let stop = StopCondition::new(vec![310], 4).unwrap();
    let err = generate(&model, &[], &mut sampler, &stop, |_| {}).unwrap_err();
    assert!(err.to_string().contains("prompt has no tokens"), "{err}");

    let err = generate(&model, &[1, 320], &mut sampler, &stop, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("320") && err.to_string().contains("vocabulary"),
        "{err}"
    );

    let mut cache = model.new_cache();
    let wrong_dtype = Tensor::new(&[[1i64, 2]], &Device::Cpu).unwrap();
    assert!(model.forward(&wrong_dtype, &mut cache).is_err());
    let flat = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(model.forward(&flat, &mut cache).is_err());
    assert_eq!(
        cache.seq_len(),
        0,
        "failed calls must leave the cache as it was"
    );

    // A cache filled for one sequence cannot continue a batch of two.
    model
        .forward(
            &Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap(),
            &mut cache,
        )
        .unwrap();
    let two = Tensor::new(&[[3u32], [4]], &Device::Cpu).unwrap();
    let err = model.forward(&two, &mut cache).unwrap_err();
    assert!(err.to_string().contains("batch"), "{err}");
    assert_eq!(cache.seq_len(), 2);

    let err = Model::load(
        fixture("glm4"),
        &LoadOptions {
            dtype: DType::U8,
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("f32, f16 or bf16"), "{err}");
}

#[test]
fn generation_stops_on_eos() {
    let model = Model::load(fixture("glm"), &LoadOptions::default()).unwrap();
    let prompt = [87, 265, 47, 46, 244, 100, 52];
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    let free = generate(
        &model,
        &prompt,
        &mut sampler,
        &StopCondition::new(Vec::<u32>::new(), 8).unwrap(),
        |_| {},
    )
    .unwrap();
    // Make the third greedy token an eos id: generation ends there, eos included.
    let stop = StopCondition::new(vec![free.tokens[2]], 8).unwrap();
    let out = generate(&model, &prompt, &mut sampler, &stop, |_| {}).unwrap();
    let first_eos = free
        .tokens
        .iter()
        .position(|&t| t == free.tokens[2])
        .unwrap();
    assert_eq!(out.tokens, free.tokens[..=first_eos]);
    assert_eq!(out.finish, glm::sampling::FinishReason::Stop);
}
