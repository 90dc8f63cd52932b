//! Property tests: round-trip error bounds, serialization round trips, layout.

use half::{bf16, f16};
use nf4::{dynamic_map_signed, AbsmaxState, Nf4Tensor, QuantOptions, QuantType, TensorView};
use proptest::prelude::*;

fn options() -> impl Strategy<Value = QuantOptions> {
    (
        prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)],
        (5u32..=12).prop_map(|p| 1usize << p),
        any::<bool>(),
    )
        .prop_map(|(quant_type, blocksize, double_quant)| QuantOptions {
            quant_type,
            blocksize,
            double_quant,
        })
}

/// Values over many magnitudes, with zeros and runs of zeros mixed in.
fn values() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            4 => -1.0f32..1.0,
            2 => (-1.0f32..1.0, -20i32..20).prop_map(|(m, e)| m * 10f32.powi(e)),
            1 => Just(0.0f32),
        ],
        1..3000,
    )
}

fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize)
        .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// Worst error of bitsandbytes' nested 8-bit step relative to the nested scale: half the widest gap of
/// the dynamic map, plus one step of the 65536-point grid its CPU kernel snaps to first.
fn nested_relative_bound() -> f32 {
    let map = dynamic_map_signed();
    let half_gap = map
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0.0, f32::max);
    half_gap + 2.0 / 65535.0
}

fn read_back(q: &Nf4Tensor) -> Nf4Tensor {
    let stored = q.to_safetensors_tensors("w");
    Nf4Tensor::read("w", |key| {
        stored
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())
    })
    .unwrap()
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn error_is_within_half_the_widest_codebook_gap(x in values(), opts in options()) {
        let q = Nf4Tensor::quantize_f32(&x, &[x.len()], &opts).unwrap();
        let deq = q.dequantize_f32();
        let true_absmax = block_absmax(&x, opts.blocksize);
        let stored_absmax = q.absmax_f32();
        let half_gap = opts.quant_type.max_half_gap();
        let nested = match q.absmax_state() {
            AbsmaxState::Plain(_) => None,
            AbsmaxState::DoubleQuant(dq) => Some(dq),
        };
        for (i, (&v, &d)) in x.iter().zip(&deq).enumerate() {
            let b = i / opts.blocksize;
            let a = true_absmax[b];
            // The stored absmax differs from the true one only through double quantization (and the
            // 1e-38 floor of an all-zero partial block). The f32 products and differences round at the
            // scale of the larger of the two absmax values: allow a few ulps of that.
            let absmax_error = (stored_absmax[b] - a).abs();
            let rounding = a.max(stored_absmax[b]) * 1e-6;
            let bound = half_gap * a + absmax_error + rounding + f32::MIN_POSITIVE;
            prop_assert!((v - d).abs() <= bound,
                "element {i}: x {v}, deq {d}, absmax {a}, stored {}, bound {bound}", stored_absmax[b]);
            if let Some(dq) = nested {
                let scale = dq.nested_absmax()[b / dq.nested_blocksize()];
                let nested_bound = nested_relative_bound() * scale + scale * 1e-6 + 2e-38;
                // Far from zero (absmax ~1e19 with all blocks alike) the f32 offset and sums round
                // at ~1e-6 of absmax per operation: allow ten such roundings.
                prop_assert!(absmax_error <= nested_bound.max(a * 1e-5),
                    "block {b}: absmax {a}, decoded {}, nested scale {scale}", stored_absmax[b]);
            } else {
                // With the absmax stored as used, it is the nearest codebook value (up to rounding).
                let nearest = opts.quant_type.codebook().iter()
                    .map(|c| (v - c * stored_absmax[b]).abs())
                    .fold(f32::INFINITY, f32::min);
                prop_assert!((v - d).abs() <= nearest + stored_absmax[b] * 1e-6,
                    "element {i}: x {v}, deq {d} is not the nearest codebook value (error {nearest})");
            }
        }
    }

    #[test]
    fn serialized_state_reads_back_identical(x in values(), opts in options()) {
        let halves: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let brains: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let finite = halves.iter().all(|h| h.is_finite());
        let tensors = [
            Some(Nf4Tensor::quantize_f32(&x, &[1, x.len()], &opts).unwrap()),
            finite.then(|| Nf4Tensor::quantize_f16(&halves, &[x.len()], &opts).unwrap()),
            Some(Nf4Tensor::quantize_bf16(&brains, &[x.len(), 1], &opts).unwrap()),
        ];
        for q in tensors.into_iter().flatten() {
            // Includes the offset surviving its trip through Python-style JSON text.
            prop_assert_eq!(&read_back(&q), &q);
        }
    }

    #[test]
    fn half_outputs_are_the_rounded_f32_output(x in values(), opts in options()) {
        let q = Nf4Tensor::quantize_f32(&x, &[x.len()], &opts).unwrap();
        let full = q.dequantize_f32();
        let f16s: Vec<f16> = full.iter().map(|&v| f16::from_f32(v)).collect();
        let bf16s: Vec<bf16> = full.iter().map(|&v| bf16::from_f32(v)).collect();
        prop_assert_eq!(q.dequantize_f16(), f16s);
        prop_assert_eq!(q.dequantize_bf16(), bf16s);
    }

    #[test]
    fn half_inputs_quantize_as_their_f32_values(x in values(), opts in options()) {
        let brains: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let widened: Vec<f32> = brains.iter().map(|v| v.to_f32()).collect();
        let a = Nf4Tensor::quantize_bf16(&brains, &[x.len()], &opts).unwrap();
        let b = Nf4Tensor::quantize_f32(&widened, &[x.len()], &opts).unwrap();
        prop_assert_eq!(a.packed(), b.packed());
        prop_assert_eq!(a.absmax_state(), b.absmax_state());
    }
}

#[test]
fn first_element_goes_to_the_high_nibble_and_odd_counts_pad_with_zero() {
    let plain = QuantOptions {
        double_quant: false,
        ..QuantOptions::default()
    };
    let q = Nf4Tensor::quantize_f32(&[1.0, -1.0, 0.0], &[3], &plain).unwrap();
    assert_eq!(q.packed(), [0xF0, 0x77]);
    let fp4 = QuantOptions {
        quant_type: QuantType::Fp4,
        ..plain
    };
    // FP4: 1.0 is code 3, -1.0 code 11 (0xB), 0.0 code 0, padding code 0.
    let q = Nf4Tensor::quantize_f32(&[1.0, -1.0, 0.0], &[3], &fp4).unwrap();
    assert_eq!(q.packed(), [0x3B, 0x00]);
    assert_eq!(q.dequantize_f32(), [1.0, -1.0, 0.0]);
}

#[test]
fn all_zero_blocks_dequantize_to_zero() {
    for opts in [
        QuantOptions::default(),
        QuantOptions {
            double_quant: false,
            ..QuantOptions::default()
        },
    ] {
        let q = Nf4Tensor::quantize_f32(&vec![0.0; 200], &[200], &opts).unwrap();
        assert!(q.absmax_f32().iter().all(|a| a.is_finite()));
        assert!(q.dequantize_f32().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn dequantize_into_matches_and_checks_the_length() {
    let x: Vec<f32> = (0..333).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = Nf4Tensor::quantize_f32(&x, &[3, 111], &QuantOptions::default()).unwrap();
    let mut out = vec![0.0f32; 333];
    q.dequantize_f32_into(&mut out).unwrap();
    assert_eq!(out, q.dequantize_f32());
    let mut halves = vec![f16::ZERO; 333];
    q.dequantize_f16_into(&mut halves).unwrap();
    assert_eq!(halves, q.dequantize_f16());
    let mut brains = vec![bf16::ZERO; 333];
    q.dequantize_bf16_into(&mut brains).unwrap();
    assert_eq!(brains, q.dequantize_bf16());
    let err = q.dequantize_f32_into(&mut [0.0; 332]).unwrap_err();
    assert!(err.to_string().contains("333 elements but 332"), "{err}");
}
