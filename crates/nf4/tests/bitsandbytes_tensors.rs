//! Every tensor fixture: our quantization is byte-identical to bitsandbytes', our dequantization equals
//! its dequantization, and what we write is what it writes.

mod common;

use common::*;
use nf4::{AbsmaxState, Nf4Tensor, QuantOptions, QuantizedSize};
use safetensors::SafeTensors;

fn options(case: &Case) -> QuantOptions {
    QuantOptions {
        quant_type: case.quant_type.parse().unwrap(),
        blocksize: case.blocksize,
        double_quant: case.double_quant,
    }
}

fn quantize_input(case: &Case, io: &SafeTensors<'_>) -> Nf4Tensor {
    let input = tensor(io, "input");
    assert_eq!(input.shape(), case.shape.as_slice(), "{}", case.name);
    let opts = options(case);
    let q = match case.dtype.as_str() {
        "float32" => Nf4Tensor::quantize_f32(&f32s(&input), &case.shape, &opts),
        "float16" => Nf4Tensor::quantize_f16(&f16s(&input), &case.shape, &opts),
        "bfloat16" => Nf4Tensor::quantize_bf16(&bf16s(&input), &case.shape, &opts),
        other => panic!("{}: dtype {other}", case.name),
    };
    q.unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn quantization_is_byte_identical_to_bitsandbytes() {
    let cases = manifest().cases;
    assert!(cases.len() >= 20, "expected the full fixture set");
    for case in &cases {
        let io_bytes = read_bytes(&format!("tensors/{}.io.safetensors", case.name));
        let io = SafeTensors::deserialize(&io_bytes).unwrap();
        let state_bytes = read_bytes(&format!("tensors/{}.safetensors", case.name));
        let state = SafeTensors::deserialize(&state_bytes).unwrap();
        let name = &case.name;

        let ours = quantize_input(case, &io);
        assert_eq!(
            ours.packed(),
            tensor(&state, "weight").data(),
            "{name}: packed codes"
        );
        match ours.absmax_state() {
            AbsmaxState::Plain(absmax) => {
                assert!(!case.double_quant);
                assert_eq!(
                    bits(absmax),
                    bits(&f32s(&tensor(&state, "weight.absmax"))),
                    "{name}: absmax"
                );
            }
            AbsmaxState::DoubleQuant(dq) => {
                assert!(case.double_quant);
                assert_eq!(
                    dq.codes(),
                    tensor(&state, "weight.absmax").data(),
                    "{name}: absmax codes"
                );
                let nested = f32s(&tensor(&state, "weight.nested_absmax"));
                assert_eq!(
                    bits(dq.nested_absmax()),
                    bits(&nested),
                    "{name}: nested absmax"
                );
                let map = f32s(&tensor(&state, "weight.nested_quant_map"));
                assert_eq!(
                    bits(dq.nested_map()),
                    bits(&map),
                    "{name}: nested quant map"
                );
            }
        }
        let qt = ours.quant_type();
        let state_key = format!("weight.quant_state.bitsandbytes__{qt}");
        // The JSON carries the offset (Python repr of the f32), so equal bytes mean an equal offset.
        assert_eq!(
            ours.quant_state_json(),
            String::from_utf8(tensor(&state, &state_key).data().to_vec()).unwrap(),
            "{name}: quant state JSON"
        );
        assert_eq!(
            bits(qt.codebook()),
            bits(&f32s(&tensor(&state, "weight.quant_map"))),
            "{name}: quant map"
        );

        let read = Nf4Tensor::read("weight", lookup(&state))
            .unwrap()
            .expect("quantized");
        assert_eq!(read, ours, "{name}: state read from bitsandbytes' file");
    }
}

#[test]
fn dequantization_equals_bitsandbytes() {
    for case in &manifest().cases {
        let io_bytes = read_bytes(&format!("tensors/{}.io.safetensors", case.name));
        let io = SafeTensors::deserialize(&io_bytes).unwrap();
        let state_bytes = read_bytes(&format!("tensors/{}.safetensors", case.name));
        let state = SafeTensors::deserialize(&state_bytes).unwrap();
        let q = Nf4Tensor::read("weight", lookup(&state))
            .unwrap()
            .expect("quantized");
        let name = &case.name;
        assert_same_values(
            &format!("{name} f32"),
            &q.dequantize_f32(),
            &f32s(&tensor(&io, "dequant_float32")),
        );
        assert_same_values(
            &format!("{name} f16"),
            &q.dequantize_f16(),
            &f16s(&tensor(&io, "dequant_float16")),
        );
        assert_same_values(
            &format!("{name} bf16"),
            &q.dequantize_bf16(),
            &bf16s(&tensor(&io, "dequant_bfloat16")),
        );
    }
}

#[test]
fn written_files_equal_bitsandbytes_files() {
    let dir = tempfile::tempdir().unwrap();
    for case in &manifest().cases {
        let io_bytes = read_bytes(&format!("tensors/{}.io.safetensors", case.name));
        let io = SafeTensors::deserialize(&io_bytes).unwrap();
        let theirs_bytes = read_bytes(&format!("tensors/{}.safetensors", case.name));
        let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
        let name = &case.name;

        let ours = quantize_input(case, &io);
        let path = dir.path().join(format!("{name}.safetensors"));
        nf4::save_file(&path, ours.to_safetensors_tensors("weight")).unwrap();
        let ours_bytes = std::fs::read(&path).unwrap();
        let ours_st = SafeTensors::deserialize(&ours_bytes).unwrap();

        // Same keys, dtypes and shapes as bitsandbytes' state dict...
        let mut their_keys = theirs.names();
        their_keys.sort();
        let mut our_keys = ours_st.names();
        our_keys.sort();
        assert_eq!(our_keys, their_keys, "{name}: keys");
        for key in their_keys {
            let (a, b) = (tensor(&ours_st, key), tensor(&theirs, key));
            assert_eq!(
                (a.dtype(), a.shape()),
                (b.dtype(), b.shape()),
                "{name}: {key}"
            );
        }
        // ...and, the header layout being the same too, the very same file.
        assert_eq!(ours_bytes, theirs_bytes, "{name}: file bytes");

        let reread = Nf4Tensor::read("weight", lookup(&ours_st))
            .unwrap()
            .unwrap();
        assert_eq!(reread, ours, "{name}: re-read");

        // The sizes the planner is told match the stored tensors (all but the JSON state).
        let stored: usize = ours
            .to_safetensors_tensors("weight")
            .iter()
            .filter(|(k, _)| !k.contains(".quant_state."))
            .map(|(_, t)| t.data.len())
            .sum();
        let numel: usize = case.shape.iter().product();
        let planned = QuantizedSize::new(numel, &options(case)).unwrap();
        assert_eq!(planned, ours.size(), "{name}: size breakdown");
        assert_eq!(planned.total(), stored, "{name}: stored bytes");
        assert_eq!(nf4::packed_bytes(numel, &options(case)).unwrap(), stored);
    }
    // Temp files were renamed into place, none left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn torch_mean_matches_torch() {
    let bytes = read_bytes("torch_mean.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for (key, view) in st.tensors() {
        let Some(n) = key.strip_prefix("values_") else {
            continue;
        };
        let want = f32s(&tensor(&st, &format!("mean_{n}")))[0];
        let got = nf4::torch_mean(&f32s(&view));
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "mean of {n} values: ours {got}, torch {want}"
        );
        checked += 1;
    }
    assert!(checked >= 20);
}
