//! Fixture access shared by the integration tests (fixtures made by
//! tests/fixtures/make_nf4_fixtures.py with bitsandbytes 0.50.2 + transformers 5.17 on the CPU).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use half::{bf16, f16};
use nf4::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::Deserialize;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/nf4")
}

#[derive(Deserialize)]
pub struct Manifest {
    pub cases: Vec<Case>,
}

#[derive(Deserialize, Clone, Debug)]
pub struct Case {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub quant_type: String,
    pub blocksize: usize,
    pub double_quant: bool,
}

pub fn manifest() -> Manifest {
    let path = fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn read_bytes(rel: &str) -> Vec<u8> {
    let path = fixture_dir().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/fixtures/make_nf4_fixtures.py)",
            path.display()
        )
    })
}

pub fn tensor<'a>(st: &'a SafeTensors<'a>, key: &str) -> TensorView<'a> {
    st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"))
}

pub fn f32s(view: &TensorView<'_>) -> Vec<f32> {
    assert_eq!(view.dtype(), Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn u16s(view: &TensorView<'_>) -> Vec<u16> {
    view.data()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

pub fn f16s(view: &TensorView<'_>) -> Vec<f16> {
    assert_eq!(view.dtype(), Dtype::F16);
    u16s(view).into_iter().map(f16::from_bits).collect()
}

pub fn bf16s(view: &TensorView<'_>) -> Vec<bf16> {
    assert_eq!(view.dtype(), Dtype::BF16);
    u16s(view).into_iter().map(bf16::from_bits).collect()
}

/// Equal values (+0.0 == -0.0: bitsandbytes' CPU kernels differ in the sign of FP4's zero).
pub fn assert_same_values<T: PartialEq + Copy + std::fmt::Debug>(
    what: &str,
    ours: &[T],
    theirs: &[T],
) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
        panic!(
            "{what}: element {i}: ours {:?}, bitsandbytes {:?}",
            ours[i], theirs[i]
        );
    }
}

/// A lookup over one safetensors file, as `Nf4Tensor::read` takes it.
pub fn lookup<'a>(st: &'a SafeTensors<'a>) -> impl FnMut(&str) -> Option<TensorView<'a>> + 'a {
    move |key| st.tensor(key).ok()
}
