//! The serialized form of a 4-bit weight, exactly as transformers + bitsandbytes write it to
//! safetensors. For a weight `W`:
//!
//! | key | dtype | shape |
//! | --- | --- | --- |
//! | `W` | U8, or the `bnb_4bit_quant_storage` dtype | `[(n + 1) / 2, 1]` bytes |
//! | `W.absmax` | U8 with double quant, else F32 | `[blocks]` |
//! | `W.nested_absmax` | F32 (double quant) | `[ceil(blocks / 256)]` |
//! | `W.nested_quant_map` | F32 (double quant) | `[256]` |
//! | `W.quant_map` | F32 | `[16]` |
//! | `W.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 bytes of JSON | `[len]` |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type", "blocksize", "dtype", "shape"}` plus
//! `"nested_blocksize", "nested_dtype", "nested_offset"` when double-quantized.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView, View};
use serde::Deserialize;

use crate::codebook::QuantType;
use crate::tensor::{check_blocksize, AbsmaxState, DoubleQuantAbsmax, FloatDtype, Nf4Tensor};
use crate::Nf4Error;

/// Key infix of the packed JSON quant state: `W.quant_state.bitsandbytes__nf4`.
const QUANT_STATE_INFIX: &str = ".quant_state.bitsandbytes__";
const QUANT_TYPES: [QuantType; 2] = [QuantType::Nf4, QuantType::Fp4];

/// An owned tensor to write with safetensors.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl StoredTensor {
    fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        StoredTensor {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }

    fn f32(values: &[f32]) -> Self {
        StoredTensor {
            dtype: Dtype::F32,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl View for StoredTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn quant_state_key(name: &str, quant_type: QuantType) -> String {
    format!("{name}{QUANT_STATE_INFIX}{quant_type}")
}

/// Whether `name` is stored as a bitsandbytes 4-bit weight among `keys` (it has a quant state).
pub fn is_quantized<K: AsRef<str>>(name: &str, keys: impl IntoIterator<Item = K>) -> bool {
    let wanted = QUANT_TYPES.map(|qt| quant_state_key(name, qt));
    keys.into_iter()
        .any(|k| wanted.iter().any(|w| w == k.as_ref()))
}

/// Names of all 4-bit weights among `keys`, sorted.
pub fn quantized_weight_names<K: AsRef<str>>(keys: impl IntoIterator<Item = K>) -> Vec<String> {
    let mut names: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let k = k.as_ref();
            let (name, suffix) = k.rsplit_once(QUANT_STATE_INFIX)?;
            suffix.parse::<QuantType>().ok().map(|_| name.to_string())
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The JSON quant state; unknown keys are refused, as bitsandbytes refuses them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Option<Vec<usize>>,
    nested_blocksize: Option<usize>,
    nested_dtype: Option<String>,
    nested_offset: Option<f64>,
}

fn le_f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reads one weight's tensors through the caller's lookup, with errors that name the key.
struct StateReader<'n, F> {
    name: &'n str,
    lookup: F,
}

impl<'data, F: FnMut(&str) -> Option<TensorView<'data>>> StateReader<'_, F> {
    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.name)
    }

    fn get(&mut self, suffix: &str) -> Result<(String, TensorView<'data>), Nf4Error> {
        let key = self.key(suffix);
        match (self.lookup)(&key) {
            Some(view) => Ok((key, view)),
            None => Err(Nf4Error::MissingTensor {
                key,
                weight: self.name.to_string(),
            }),
        }
    }

    /// An F32 tensor of exactly `len` values.
    fn f32s(
        &mut self,
        suffix: &str,
        len: usize,
        why: impl FnOnce() -> String,
    ) -> Result<Vec<f32>, Nf4Error> {
        let (key, view) = self.get(suffix)?;
        if view.dtype() != Dtype::F32 {
            return Err(Nf4Error::WrongDtype {
                key,
                found: view.dtype(),
                expected: "F32",
            });
        }
        check_len(&key, view.data().len(), len * 4, why)?;
        Ok(le_f32s(view.data()))
    }
}

fn check_len(
    key: &str,
    found: usize,
    expected: usize,
    why: impl FnOnce() -> String,
) -> Result<(), Nf4Error> {
    if found == expected {
        Ok(())
    } else {
        Err(Nf4Error::WrongSize {
            key: key.to_string(),
            found,
            expected,
            why: why(),
        })
    }
}

impl Nf4Tensor {
    /// Read the 4-bit weight `name` through `lookup`, which returns the tensor stored under a key (from
    /// one file or many shards). `Ok(None)` when `name` has no quant state, i.e. is not quantized.
    pub fn read<'data, F>(name: &str, mut lookup: F) -> Result<Option<Self>, Nf4Error>
    where
        F: FnMut(&str) -> Option<TensorView<'data>>,
    {
        let mut found = QUANT_TYPES
            .into_iter()
            .filter_map(|qt| {
                let key = quant_state_key(name, qt);
                lookup(&key).map(|view| (qt, key, view))
            })
            .collect::<Vec<_>>();
        let (key_type, state_key, state_view) = match found.len() {
            0 => return Ok(None),
            1 => found.remove(0),
            _ => {
                return Err(Nf4Error::BadQuantState {
                    key: quant_state_key(name, QuantType::Nf4),
                    reason: "both an nf4 and an fp4 quant state are stored for this weight".into(),
                })
            }
        };
        if state_view.dtype() != Dtype::U8 {
            return Err(Nf4Error::WrongDtype {
                key: state_key,
                found: state_view.dtype(),
                expected: "U8 (JSON bytes)",
            });
        }
        let bad_state = |reason: String| Nf4Error::BadQuantState {
            key: state_key.clone(),
            reason,
        };
        let json: QuantStateJson = serde_json::from_slice(state_view.data())
            .map_err(|e| bad_state(format!("not the JSON bitsandbytes writes: {e}")))?;
        let quant_type: QuantType = json
            .quant_type
            .parse()
            .map_err(|e: Nf4Error| bad_state(e.to_string()))?;
        if quant_type != key_type {
            return Err(bad_state(format!(
                "says quant_type \"{quant_type}\" but is stored under the {key_type} key"
            )));
        }
        check_blocksize(json.blocksize).map_err(|e| bad_state(e.to_string()))?;
        let dtype: FloatDtype = json
            .dtype
            .parse()
            .map_err(|e: Nf4Error| bad_state(e.to_string()))?;
        let shape = json.shape.ok_or_else(|| bad_state("has no shape".into()))?;
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Err(bad_state(format!("shape {shape:?} has no elements")));
        }
        let blocksize = json.blocksize;
        let blocks = numel.div_ceil(blocksize);
        let blocks_why = || {
            format!(
                "blocksize {blocksize} over {numel} elements (shape {shape:?}) gives {blocks} blocks; \
                 the quant state's blocksize or shape does not match the data"
            )
        };

        let mut reader = StateReader { name, lookup };
        let (packed_key, packed_view) = reader.get("")?;
        // Any storage dtype (bnb_4bit_quant_storage) is a view of the same packed bytes.
        check_len(
            &packed_key,
            packed_view.data().len(),
            numel.div_ceil(2),
            || {
                format!(
                "{numel} elements (shape {shape:?}) pack into {} bytes; the tensor is truncated or \
                 the quant state's shape is wrong",
                numel.div_ceil(2)
            )
            },
        )?;
        let packed = packed_view.data().to_vec();
        // bitsandbytes decodes by quant_type, not by this map; it must still be there and well-formed.
        reader.f32s(".quant_map", 16, || "a 4-bit code map has 16 values".into())?;

        let nested = (json.nested_blocksize, json.nested_dtype, json.nested_offset);
        let absmax = match nested {
            (None, None, None) => {
                let nested_key = reader.key(".nested_absmax");
                if (reader.lookup)(&nested_key).is_some() {
                    return Err(bad_state(
                        "has no nested_* fields but a nested_absmax tensor is stored".into(),
                    ));
                }
                AbsmaxState::Plain(reader.f32s(".absmax", blocks, blocks_why)?)
            }
            (Some(nested_blocksize), Some(nested_dtype), Some(offset)) => {
                if nested_blocksize == 0 {
                    return Err(bad_state("nested_blocksize is 0".into()));
                }
                if nested_dtype != "float32" {
                    return Err(bad_state(format!(
                        "nested_dtype \"{nested_dtype}\" is not float32, the only one bitsandbytes writes"
                    )));
                }
                let (codes_key, codes_view) = reader.get(".absmax")?;
                if codes_view.dtype() != Dtype::U8 {
                    return Err(Nf4Error::WrongDtype {
                        key: codes_key,
                        found: codes_view.dtype(),
                        expected: "U8 (double-quantized absmax)",
                    });
                }
                check_len(&codes_key, codes_view.data().len(), blocks, blocks_why)?;
                let nested_blocks = blocks.div_ceil(nested_blocksize);
                let nested_absmax = reader.f32s(".nested_absmax", nested_blocks, || {
                    format!("{blocks} absmax codes in nested blocks of {nested_blocksize} need {nested_blocks} scales")
                })?;
                let nested_map = reader.f32s(".nested_quant_map", 256, || {
                    "an 8-bit code map has 256 values".into()
                })?;
                AbsmaxState::DoubleQuant(DoubleQuantAbsmax {
                    codes: codes_view.data().to_vec(),
                    nested_absmax,
                    // Python's float -> torch f32, round to nearest.
                    offset: offset as f32,
                    nested_blocksize,
                    nested_map,
                })
            }
            _ => {
                return Err(bad_state(
                    "has some but not all of nested_blocksize, nested_dtype, nested_offset".into(),
                ))
            }
        };
        Ok(Some(Nf4Tensor {
            quant_type,
            blocksize,
            shape,
            dtype,
            packed,
            absmax,
        }))
    }

    /// The tensors transformers + bitsandbytes store for this weight under `name`.
    pub fn to_safetensors_tensors(&self, name: &str) -> Vec<(String, StoredTensor)> {
        let mut out = vec![(
            name.to_string(),
            StoredTensor::u8(vec![self.packed.len(), 1], self.packed.clone()),
        )];
        match &self.absmax {
            AbsmaxState::Plain(absmax) => {
                out.push((format!("{name}.absmax"), StoredTensor::f32(absmax)))
            }
            AbsmaxState::DoubleQuant(dq) => {
                out.push((
                    format!("{name}.absmax"),
                    StoredTensor::u8(vec![dq.codes.len()], dq.codes.clone()),
                ));
                out.push((
                    format!("{name}.nested_absmax"),
                    StoredTensor::f32(&dq.nested_absmax),
                ));
                out.push((
                    format!("{name}.nested_quant_map"),
                    StoredTensor::f32(&dq.nested_map),
                ));
            }
        }
        out.push((
            format!("{name}.quant_map"),
            StoredTensor::f32(self.quant_type.codebook()),
        ));
        let json = self.quant_state_json().into_bytes();
        out.push((
            quant_state_key(name, self.quant_type),
            StoredTensor::u8(vec![json.len()], json),
        ));
        out
    }

    /// The JSON quant state, byte for byte as bitsandbytes' `pack_dict_to_tensor` writes it.
    pub fn quant_state_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut json = format!(
            r#"{{"quant_type": "{}", "blocksize": {}, "dtype": "{}", "shape": [{}]"#,
            self.quant_type,
            self.blocksize,
            self.dtype,
            shape.join(", ")
        );
        if let AbsmaxState::DoubleQuant(dq) = &self.absmax {
            json.push_str(&format!(
                r#", "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {}"#,
                dq.nested_blocksize,
                python_float_repr(f64::from(dq.offset))
            ));
        }
        json.push('}');
        json
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form when the decimal exponent is
/// below -4 or above 15 (`1e-05`, `1.5e+16`), otherwise fixed with at least one decimal (`100.0`).
fn python_float_repr(value: f64) -> String {
    let sci = format!("{:e}", value.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    let point = exp + 1; // value = 0.<digits> * 10^point
    let sign = if value.is_sign_negative() { "-" } else { "" };
    let body = if point <= -4 || point > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{exp_sign}{:02}", exp.abs())
    } else if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// Write tensors as a safetensors file with transformers' metadata (`{"format": "pt"}`), through a
/// temporary file in the same directory renamed into place, so a failure leaves no partial file.
pub fn save_file<S, V, I>(path: &Path, tensors: I) -> Result<(), Nf4Error>
where
    S: AsRef<str> + Ord + Display,
    V: View,
    I: IntoIterator<Item = (S, V)>,
{
    let io_err = |source| Nf4Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let tmp: PathBuf = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Err(source) = safetensors::serialize_to_file(tensors, Some(metadata), &tmp) {
        // Best effort: the write already failed; a leftover temp file is all that can remain.
        let _ = std::fs::remove_file(&tmp);
        return Err(Nf4Error::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        io_err(source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_python() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (100.0, "100.0"),
            (0.5, "0.5"),
            (-0.25, "-0.25"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (f64::from(0.258_754_6_f32), "0.2587546110153198"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float_repr(v), want, "repr({v:e})");
        }
    }

    #[test]
    fn weight_names_come_from_quant_state_keys() {
        let keys = [
            "a.weight",
            "a.weight.quant_state.bitsandbytes__nf4",
            "b.weight.quant_state.bitsandbytes__fp4",
            "c.weight.quant_state.bitsandbytes__int8",
            "d.bias",
        ];
        assert_eq!(quantized_weight_names(keys), ["a.weight", "b.weight"]);
        assert!(is_quantized("b.weight", keys));
        assert!(!is_quantized("c.weight", keys));
        assert!(!is_quantized("d.bias", keys));
    }
}
