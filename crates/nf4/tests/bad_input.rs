//! Bad input gets a typed error that names the tensor, never a panic.

use std::collections::BTreeMap;

use half::f16;
use nf4::{
    Dtype, Nf4Error, Nf4Tensor, QuantOptions, QuantType, QuantizationConfig, StoredTensor,
    TensorView,
};

const NAME: &str = "model.layers.0.mlp.down_proj.weight";

fn stored_state(opts: &QuantOptions) -> BTreeMap<String, StoredTensor> {
    let data: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    Nf4Tensor::quantize_f32(&data, &[10, 100], opts)
        .unwrap()
        .to_safetensors_tensors(NAME)
        .into_iter()
        .collect()
}

fn read(state: &BTreeMap<String, StoredTensor>) -> Result<Option<Nf4Tensor>, Nf4Error> {
    Nf4Tensor::read(NAME, |key| {
        state.get(key).map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data).expect("consistent test tensor")
        })
    })
}

fn state_key() -> String {
    format!("{NAME}.quant_state.bitsandbytes__nf4")
}

fn set_json(state: &mut BTreeMap<String, StoredTensor>, json: &str) {
    let t = state.get_mut(&state_key()).unwrap();
    t.data = json.as_bytes().to_vec();
    t.shape = vec![t.data.len()];
}

fn edit_json(state: &mut BTreeMap<String, StoredTensor>, from: &str, to: &str) {
    let json = String::from_utf8(state[&state_key()].data.clone()).unwrap();
    assert!(json.contains(from), "{json}");
    set_json(state, &json.replace(from, to));
}

fn message(result: Result<Option<Nf4Tensor>, Nf4Error>) -> String {
    match result {
        Ok(_) => panic!("bad state was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn good_state_reads_back() {
    let state = stored_state(&QuantOptions::default());
    let tensor = read(&state).unwrap().unwrap();
    assert_eq!(tensor.shape(), [10, 100]);
    assert!(Nf4Tensor::read("other.weight", |key| state
        .get(key)
        .map(|t| TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
    .unwrap()
    .is_none());
}

#[test]
fn truncated_packed_codes() {
    let mut state = stored_state(&QuantOptions::default());
    let w = state.get_mut(NAME).unwrap();
    w.data.pop();
    w.shape = vec![w.data.len(), 1];
    let msg = message(read(&state));
    assert!(
        msg.contains(NAME) && msg.contains("499") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn truncated_absmax_and_nested_absmax() {
    let mut state = stored_state(&QuantOptions::default());
    let a = state.get_mut(&format!("{NAME}.absmax")).unwrap();
    a.data.truncate(10);
    a.shape = vec![10];
    let msg = message(read(&state));
    assert!(
        msg.contains(".absmax") && msg.contains("16 blocks"),
        "{msg}"
    );

    let mut state = stored_state(&QuantOptions::default());
    let n = state.get_mut(&format!("{NAME}.nested_absmax")).unwrap();
    n.data.clear();
    n.shape = vec![0];
    let msg = message(read(&state));
    assert!(msg.contains(".nested_absmax"), "{msg}");
}

#[test]
fn blocksize_that_does_not_match_the_data() {
    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "\"blocksize\": 64", "\"blocksize\": 128");
    let msg = message(read(&state));
    assert!(
        msg.contains("blocksize 128") && msg.contains("does not match"),
        "{msg}"
    );
}

#[test]
fn shape_that_does_not_match_the_data() {
    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "[10, 100]", "[10, 101]");
    let msg = message(read(&state));
    assert!(msg.contains("[10, 101]"), "{msg}");
}

#[test]
fn quant_state_that_does_not_parse() {
    let mut state = stored_state(&QuantOptions::default());
    set_json(&mut state, "{\"quant_type\": \"nf4\", \"blocksize\": ");
    let msg = message(read(&state));
    assert!(
        msg.contains("quant_state.bitsandbytes__nf4") && msg.contains("JSON"),
        "{msg}"
    );

    let mut state = stored_state(&QuantOptions::default());
    set_json(&mut state, "\u{fffd}\u{fffd}");
    assert!(message(read(&state)).contains("JSON"));
}

#[test]
fn quant_state_with_unknown_type_or_fields() {
    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "\"nf4\"", "\"int4\"");
    let msg = message(read(&state));
    assert!(msg.contains("int4") && msg.contains("nf4"), "{msg}");

    let mut state = stored_state(&QuantOptions::default());
    edit_json(
        &mut state,
        "\"dtype\": \"float32\"",
        "\"dtype\": \"float8\"",
    );
    assert!(message(read(&state)).contains("float8"));

    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "\"blocksize\": 64", "\"blocksize\": 48");
    assert!(message(read(&state)).contains("48"));

    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "{", "{\"codebook\": \"mine\", ");
    assert!(message(read(&state)).contains("codebook"));

    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, ", \"nested_dtype\": \"float32\"", "");
    assert!(message(read(&state)).contains("not all"));

    // An fp4 state under the nf4 key.
    let mut state = stored_state(&QuantOptions::default());
    edit_json(&mut state, "\"nf4\"", "\"fp4\"");
    assert!(message(read(&state)).contains("stored under the nf4 key"));
}

#[test]
fn missing_or_mistyped_tensors() {
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
    ] {
        let mut state = stored_state(&QuantOptions::default());
        state.remove(&format!("{NAME}{suffix}"));
        let msg = message(read(&state));
        assert!(
            msg.contains(&format!("`{NAME}{suffix}` is missing")),
            "{msg}"
        );
    }
    let mut state = stored_state(&QuantOptions::default());
    let a = state.get_mut(&format!("{NAME}.absmax")).unwrap();
    a.dtype = Dtype::I8;
    assert!(message(read(&state)).contains("dtype I8"));

    // Plain absmax must be F32.
    let mut state = stored_state(&QuantOptions {
        double_quant: false,
        ..QuantOptions::default()
    });
    let a = state.get_mut(&format!("{NAME}.absmax")).unwrap();
    a.dtype = Dtype::U8;
    a.shape = vec![a.data.len()];
    assert!(message(read(&state)).contains("expected F32"));
}

#[test]
fn quantize_refuses_bad_input() {
    let data = vec![0.5f32; 256];
    for bad in [0, 1, 16, 48, 100, 8192] {
        let opts = QuantOptions {
            blocksize: bad,
            ..QuantOptions::default()
        };
        let err = Nf4Tensor::quantize_f32(&data, &[256], &opts).unwrap_err();
        assert!(matches!(err, Nf4Error::BadBlocksize(b) if b == bad));
        assert!(err.to_string().contains("power of two from 32 to 4096"));
    }
    let opts = QuantOptions::default();
    let err = Nf4Tensor::quantize_f32(&data, &[16, 15], &opts).unwrap_err();
    assert!(err.to_string().contains("240 elements but 256"), "{err}");
    assert!(matches!(
        Nf4Tensor::quantize_f32(&[], &[0, 4], &opts),
        Err(Nf4Error::Empty(_))
    ));

    let mut with_nan = data.clone();
    with_nan[77] = f32::NAN;
    let err = Nf4Tensor::quantize_f32(&with_nan, &[256], &opts).unwrap_err();
    assert!(
        matches!(err, Nf4Error::NonFinite { index: 77, .. }),
        "{err}"
    );
    let halves = vec![f16::INFINITY; 64];
    assert!(matches!(
        Nf4Tensor::quantize_f16(&halves, &[64], &opts),
        Err(Nf4Error::NonFinite { index: 0, .. })
    ));

    // Absmax values whose f32 mean overflows cannot be double-quantized; plain absmax works.
    let huge = vec![f32::MAX; 64 * 8];
    let err = Nf4Tensor::quantize_f32(&huge, &[512], &opts).unwrap_err();
    assert!(matches!(err, Nf4Error::OffsetOverflow), "{err}");
    let plain = QuantOptions {
        double_quant: false,
        ..opts
    };
    let q = Nf4Tensor::quantize_f32(&huge, &[512], &plain).unwrap();
    assert!(q.dequantize_f32().iter().all(|&v| v == f32::MAX));
}

#[test]
fn bad_quantization_configs() {
    let parse = |s: &str| QuantizationConfig::from_model_config(&serde_json::from_str(s).unwrap());
    let err = parse(r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "int4"}}"#)
        .unwrap_err();
    assert!(err.to_string().contains("int4"), "{err}");
    // The message names the key, not only the value (transformers saves float64 compute).
    let err = parse(r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_compute_dtype": "float64"}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bnb_4bit_compute_dtype") && err.contains("float64"),
        "{err}"
    );
    let err = parse(r#"{"quantization_config": {"load_in_4bit": true}}"#).unwrap_err();
    assert!(err.to_string().contains("quant_method"), "{err}");

    let gptq = parse(r#"{"quantization_config": {"quant_method": "gptq", "bits": 4}}"#)
        .unwrap()
        .unwrap();
    assert!(gptq
        .quant_options()
        .unwrap_err()
        .to_string()
        .contains("gptq"));
    let int8 =
        parse(r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true}}"#)
            .unwrap()
            .unwrap();
    assert!(int8
        .quant_options()
        .unwrap_err()
        .to_string()
        .contains("load_in_4bit"));
    let fp4 =
        parse(r#"{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}}"#)
            .unwrap()
            .unwrap();
    // transformers' default quant type is fp4.
    assert_eq!(fp4.quant_options().unwrap().quant_type, QuantType::Fp4);
    // Any storage dtype transformers accepts holds the same packed bytes; other names are refused.
    let storage = |dtype: &str| {
        let text = format!(
            r#"{{"quantization_config": {{"quant_method": "bitsandbytes", "load_in_4bit": true,
                 "bnb_4bit_quant_storage": "{dtype}"}}}}"#
        );
        parse(&text).unwrap().unwrap().quant_options()
    };
    for dtype in ["uint8", "bfloat16", "float16", "float32"] {
        assert_eq!(
            storage(dtype).unwrap().quant_type,
            QuantType::Fp4,
            "{dtype}"
        );
    }
    let err = storage("complex64").unwrap_err().to_string();
    assert!(
        err.contains("bnb_4bit_quant_storage \"complex64\""),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("config.json");
    let err = QuantizationConfig::read_model_config(&missing).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(&missing, "{ not json").unwrap();
    let err = QuantizationConfig::read_model_config(&missing).unwrap_err();
    assert!(matches!(err, Nf4Error::Json { .. }), "{err}");
    let mut not_object = serde_json::json!([1, 2]);
    assert!(fp4.insert_into(&mut not_object).is_err());
}

#[test]
fn failed_save_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let q = Nf4Tensor::quantize_f32(&[0.25; 64], &[64], &QuantOptions::default()).unwrap();
    let path = dir.path().join("missing_dir").join("w.safetensors");
    let err = nf4::save_file(&path, q.to_safetensors_tensors("w")).unwrap_err();
    assert!(err.to_string().contains("w.safetensors"), "{err}");
    assert!(!path.exists());

    // A tensor whose data does not fill its shape is refused by safetensors; nothing is left behind.
    let path = dir.path().join("w.safetensors");
    let bad = StoredTensor {
        dtype: Dtype::F32,
        shape: vec![4],
        data: vec![0; 3],
    };
    assert!(nf4::save_file(&path, [("w", bad)]).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
