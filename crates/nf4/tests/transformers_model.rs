//! The tiny Glm4ForCausalLM that transformers saved with BitsAndBytesConfig(load_in_4bit, nf4, double
//! quant) on the CPU: we read its state and config, reproduce its quantization from the float weights,
//! and rewrite its model.safetensors byte for byte.

mod common;

use common::*;
use nf4::{FloatDtype, Nf4Tensor, QuantOptions, QuantizationConfig, StoredTensor};
use safetensors::SafeTensors;

const MODEL: &str = "tiny-glm4-nf4";

#[test]
fn reads_the_quantization_config() {
    let path = fixture_dir().join(MODEL).join("config.json");
    let config = QuantizationConfig::read_model_config(&path)
        .unwrap()
        .expect("quantized model");
    assert_eq!(config.quant_options().unwrap(), QuantOptions::default());
    assert_eq!(config.bnb_4bit_compute_dtype, FloatDtype::F32);
    assert_eq!(config.llm_int8_skip_modules, None);

    // Written back the way transformers writes it: same keys and values.
    let raw: serde_json::Value =
        serde_json::from_slice(&read_bytes(&format!("{MODEL}/config.json"))).unwrap();
    let theirs = &raw["quantization_config"];
    assert_eq!(&config.to_json(), theirs);
    assert_eq!(
        &QuantizationConfig::new(&QuantOptions::default(), FloatDtype::F32).to_json(),
        theirs
    );
    assert_eq!(
        serde_json::to_string(&config.to_json()).unwrap(),
        serde_json::to_string(theirs).unwrap(),
        "key order"
    );

    let mut copy = raw.clone();
    copy.as_object_mut().unwrap().remove("quantization_config");
    assert!(QuantizationConfig::from_model_config(&copy)
        .unwrap()
        .is_none());
    config.insert_into(&mut copy).unwrap();
    assert_eq!(copy, raw);
}

#[test]
fn reproduces_and_rewrites_the_saved_model() {
    let model_bytes = read_bytes(&format!("{MODEL}/model.safetensors"));
    let model = SafeTensors::deserialize(&model_bytes).unwrap();
    let original_bytes = read_bytes(&format!("{MODEL}/original.safetensors"));
    let original = SafeTensors::deserialize(&original_bytes).unwrap();
    let config =
        QuantizationConfig::read_model_config(&fixture_dir().join(MODEL).join("config.json"))
            .unwrap()
            .unwrap();
    let opts = config.quant_options().unwrap();

    let names = nf4::quantized_weight_names(model.names());
    // 2 layers x (q, k, v, o, gate_up, down); embeddings and lm_head stay unquantized.
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(!nf4::is_quantized("lm_head.weight", model.names()));
    assert!(!nf4::is_quantized(
        "model.embed_tokens.weight",
        model.names()
    ));

    let mut rewritten: Vec<(String, StoredTensor)> = Vec::new();
    for name in &names {
        let theirs = Nf4Tensor::read(name, lookup(&model))
            .unwrap()
            .expect("quantized");
        let input = tensor(&original, name);
        assert_eq!(theirs.shape(), input.shape(), "{name}");
        let ours = Nf4Tensor::quantize_f32(&f32s(&input), input.shape(), &opts).unwrap();
        assert_eq!(
            ours, theirs,
            "{name}: quantization differs from transformers + bitsandbytes"
        );
        rewritten.extend(ours.to_safetensors_tensors(name));
    }
    let quantized_keys: Vec<String> = rewritten.iter().map(|(k, _)| k.clone()).collect();
    for (key, view) in model.tensors() {
        if !quantized_keys.contains(&key) {
            rewritten.push((
                key,
                StoredTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            ));
        }
    }
    assert_eq!(rewritten.len(), model.len(), "every key accounted for");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    nf4::save_file(&path, rewritten).unwrap();
    assert!(
        std::fs::read(&path).unwrap() == model_bytes,
        "rewritten model.safetensors differs"
    );
}

#[test]
fn dequantization_equals_bitsandbytes_for_model_layers() {
    let model_bytes = read_bytes(&format!("{MODEL}/model.safetensors"));
    let model = SafeTensors::deserialize(&model_bytes).unwrap();
    let deq_bytes = read_bytes(&format!("{MODEL}/dequant.safetensors"));
    let deq = SafeTensors::deserialize(&deq_bytes).unwrap();
    assert_eq!(deq.len(), 3);
    for (name, view) in deq.tensors() {
        let q = Nf4Tensor::read(&name, lookup(&model))
            .unwrap()
            .expect("quantized");
        assert_eq!(q.dtype(), FloatDtype::F32);
        assert_eq!(q.shape(), view.shape());
        assert_same_values(&name, &q.dequantize_f32(), &f32s(&view));
    }
}
