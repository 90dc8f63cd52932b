//! `quantization_config` of a model's config.json, as transformers' `BitsAndBytesConfig` writes it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::codebook::QuantType;
use crate::tensor::{FloatDtype, QuantOptions};
use crate::Nf4Error;

/// The block size transformers quantizes 4-bit weights with (it is not configurable there).
pub const TRANSFORMERS_BLOCKSIZE: usize = 64;

/// The `bnb_4bit_quant_storage` values transformers accepts. The packed bytes are the same in each:
/// bitsandbytes views them as a tensor of that dtype, and safetensors stores the bytes.
const QUANT_STORAGES: [&str; 6] = ["uint8", "int8", "float16", "bfloat16", "float32", "float64"];

/// transformers' `BitsAndBytesConfig.to_dict()`. Missing keys take transformers' defaults; keys this
/// struct does not name (`_load_in_4bit`, `llm_int8_threshold`, ...) are kept in `extra` and written
/// back unchanged.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    #[serde(default)]
    pub load_in_4bit: bool,
    #[serde(default)]
    pub load_in_8bit: bool,
    #[serde(default = "default_quant_type")]
    pub bnb_4bit_quant_type: QuantType,
    #[serde(default)]
    pub bnb_4bit_use_double_quant: bool,
    #[serde(default = "default_compute_dtype")]
    pub bnb_4bit_compute_dtype: FloatDtype,
    #[serde(default = "default_quant_storage")]
    pub bnb_4bit_quant_storage: String,
    /// Modules left unquantized (transformers writes `null` when none were given).
    #[serde(default)]
    pub llm_int8_skip_modules: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Whether `value` reads as the named field of [`QuantizationConfig`] (true for keys it keeps in `extra`).
fn field_parses(key: &str, value: &Value) -> bool {
    fn reads<T: for<'de> Deserialize<'de>>(value: &Value) -> bool {
        T::deserialize(value).is_ok()
    }
    match key {
        "quant_method" | "bnb_4bit_quant_storage" => reads::<String>(value),
        "load_in_4bit" | "load_in_8bit" | "bnb_4bit_use_double_quant" => reads::<bool>(value),
        "bnb_4bit_quant_type" => reads::<QuantType>(value),
        "bnb_4bit_compute_dtype" => reads::<FloatDtype>(value),
        "llm_int8_skip_modules" => reads::<Option<Vec<String>>>(value),
        _ => true,
    }
}

fn default_quant_type() -> QuantType {
    QuantType::Fp4
}

fn default_compute_dtype() -> FloatDtype {
    FloatDtype::F32
}

fn default_quant_storage() -> String {
    "uint8".to_string()
}

impl QuantizationConfig {
    /// The config transformers writes for `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type=.., bnb_4bit_use_double_quant=.., bnb_4bit_compute_dtype=..)`.
    pub fn new(opts: &QuantOptions, compute_dtype: FloatDtype) -> Self {
        let extra = BTreeMap::from([
            ("_load_in_4bit".to_string(), Value::Bool(true)),
            ("_load_in_8bit".to_string(), Value::Bool(false)),
            (
                "llm_int8_enable_fp32_cpu_offload".to_string(),
                Value::Bool(false),
            ),
            ("llm_int8_has_fp16_weight".to_string(), Value::Bool(false)),
            ("llm_int8_threshold".to_string(), Value::from(6.0)),
        ]);
        QuantizationConfig {
            quant_method: "bitsandbytes".to_string(),
            load_in_4bit: true,
            load_in_8bit: false,
            bnb_4bit_quant_type: opts.quant_type,
            bnb_4bit_use_double_quant: opts.double_quant,
            bnb_4bit_compute_dtype: compute_dtype,
            bnb_4bit_quant_storage: default_quant_storage(),
            llm_int8_skip_modules: None,
            extra,
        }
    }

    /// The `quantization_config` of a parsed config.json; `None` when the model is not quantized.
    pub fn from_model_config(config: &Value) -> Result<Option<Self>, Nf4Error> {
        match config.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(block) => Self::deserialize(block).map(Some).map_err(|e| {
                // serde names the bad value, not its key: find the key.
                let key = block.as_object().and_then(|fields| {
                    fields
                        .iter()
                        .find(|(key, value)| !field_parses(key, value))
                        .map(|(key, _)| key.as_str())
                });
                Nf4Error::Config(match key {
                    Some(key) => format!("cannot read its {key}: {e}"),
                    None => format!("cannot read it: {e}"),
                })
            }),
        }
    }

    /// Read config.json at `path` and return its `quantization_config`, if any.
    pub fn read_model_config(path: &Path) -> Result<Option<Self>, Nf4Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Nf4Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Value = serde_json::from_str(&text).map_err(|source| Nf4Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_model_config(&config).map_err(|e| match e {
            Nf4Error::Config(msg) => Nf4Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// The options of a bitsandbytes 4-bit checkpoint; refuses other methods and 8-bit.
    pub fn quant_options(&self) -> Result<QuantOptions, Nf4Error> {
        if self.quant_method != "bitsandbytes" {
            return Err(Nf4Error::Config(format!(
                "quant_method \"{}\" is not supported: only bitsandbytes 4-bit checkpoints are",
                self.quant_method
            )));
        }
        if !self.load_in_4bit {
            return Err(Nf4Error::Config(
                "load_in_4bit is false (an 8-bit or unquantized checkpoint): only 4-bit is supported".into(),
            ));
        }
        if !QUANT_STORAGES.contains(&self.bnb_4bit_quant_storage.as_str()) {
            return Err(Nf4Error::Config(format!(
                "bnb_4bit_quant_storage \"{}\" is not a dtype transformers stores 4-bit weights in ({})",
                self.bnb_4bit_quant_storage,
                QUANT_STORAGES.join(", ")
            )));
        }
        Ok(QuantOptions {
            quant_type: self.bnb_4bit_quant_type,
            blocksize: TRANSFORMERS_BLOCKSIZE,
            double_quant: self.bnb_4bit_use_double_quant,
        })
    }

    /// As JSON with keys sorted, the way transformers writes config.json (`sort_keys=True`).
    pub fn to_json(&self) -> Value {
        // A BTreeMap keeps the keys sorted whatever serde_json's `preserve_order` feature says.
        let mut map = self.extra.clone();
        let named = [
            ("quant_method", Value::from(self.quant_method.clone())),
            ("load_in_4bit", Value::from(self.load_in_4bit)),
            ("load_in_8bit", Value::from(self.load_in_8bit)),
            (
                "bnb_4bit_quant_type",
                Value::from(self.bnb_4bit_quant_type.as_str()),
            ),
            (
                "bnb_4bit_use_double_quant",
                Value::from(self.bnb_4bit_use_double_quant),
            ),
            (
                "bnb_4bit_compute_dtype",
                Value::from(self.bnb_4bit_compute_dtype.as_str()),
            ),
            (
                "bnb_4bit_quant_storage",
                Value::from(self.bnb_4bit_quant_storage.clone()),
            ),
            (
                "llm_int8_skip_modules",
                Value::from(self.llm_int8_skip_modules.clone()),
            ),
        ];
        for (key, value) in named {
            map.insert(key.to_string(), value);
        }
        Value::Object(map.into_iter().collect())
    }

    /// Set `quantization_config` in a parsed config.json.
    pub fn insert_into(&self, config: &mut Value) -> Result<(), Nf4Error> {
        match config {
            Value::Object(map) => {
                map.insert("quantization_config".to_string(), self.to_json());
                Ok(())
            }
            _ => Err(Nf4Error::Config("config.json is not a JSON object".into())),
        }
    }
}
