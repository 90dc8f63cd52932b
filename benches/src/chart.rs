//! The report's chart as SVG: decode tokens/s (with our roofline) and peak GPU memory, one bar per run,
//! ours and the peers', dense and NF4.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::record::RunRecord;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 480;
const OURS: RGBColor = RGBColor(31, 119, 180);
const OURS_NF4: RGBColor = RGBColor(110, 170, 220);
const PEER: RGBColor = RGBColor(214, 96, 39);
const PEER_NF4: RGBColor = RGBColor(240, 160, 110);

/// One bar: a label in two lines, a value, and for ours the roofline bound above it.
struct Bar {
    runtime: String,
    precision: String,
    value: f64,
    bound: Option<f64>,
    color: RGBColor,
}

fn bars(
    runs: &[RunRecord],
    value: impl Fn(&RunRecord) -> Option<f64>,
    with_bound: bool,
) -> Vec<Bar> {
    runs.iter()
        .filter_map(|r| {
            // "transformers" over "+bnb NF4": the runtime's name alone is the widest line.
            let label = r.label();
            let precision = label.strip_prefix(&r.runtime).unwrap_or(&label).trim();
            Some(Bar {
                runtime: r.runtime.clone(),
                precision: precision.to_string(),
                value: value(r)?,
                bound: with_bound
                    .then(|| r.roofline.as_ref().map(|f| f.bound_tok_s))
                    .flatten(),
                color: match (r.is_ours(), r.is_nf4()) {
                    (true, false) => OURS,
                    (true, true) => OURS_NF4,
                    (false, false) => PEER,
                    (false, true) => PEER_NF4,
                },
            })
        })
        .collect()
}

/// The chart of `runs` as an SVG document.
pub fn svg(runs: &[RunRecord], title: &str) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let root = root.titled(title, ("sans-serif", 24)).map_err(draw_error)?;
        let (left, right) = root.split_horizontally(WIDTH / 2);
        let decode = bars(runs, |r| Some(r.decode.tok_s.median), true);
        panel(
            &left,
            "decode tokens/s, batch 1 (line: roofline)",
            &decode,
            1,
        )?;
        let memory = bars(
            runs,
            |r| Some(r.memory.as_ref()?.driver_peak_bytes? as f64 / 1e9),
            false,
        );
        panel(&right, "peak GPU memory, GB (driver)", &memory, 2)?;
        root.present().map_err(draw_error)?;
    }
    Ok(out)
}

fn draw_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    caption: &str,
    bars: &[Bar],
    digits: usize,
) -> Result<()> {
    if bars.is_empty() {
        area.draw(&Text::new(
            format!("{caption}: no figures"),
            (20, 40),
            ("sans-serif", 17),
        ))
        .map_err(draw_error)?;
        return Ok(());
    }
    let top = bars
        .iter()
        .map(|b| b.value.max(b.bound.unwrap_or(0.0)))
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.15;
    let n = bars.len() as f64;
    let axis_digits = if top > 20.0 { 0 } else { 1 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n, 0.0..top)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .x_labels(0)
        .y_label_style(("sans-serif", 15))
        .y_label_formatter(&|y| format!("{y:.axis_digits$}"))
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let x = i as f64;
            Rectangle::new([(x + 0.15, 0.0), (x + 0.85, b.value)], b.color.filled())
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            let x = i as f64;
            b.bound.map(|y| {
                PathElement::new(vec![(x + 0.08, y), (x + 0.92, y)], BLACK.stroke_width(2))
            })
        }))
        .map_err(draw_error)?;
    let centered = |size| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom))
    };
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.digits$}", b.value),
                (i as f64 + 0.5, b.value + top * 0.01),
                centered(15),
            )
        }))
        .map_err(draw_error)?;
    // Labels under the axis, in pixels of the panel (the chart's own labels cannot sit at bar centres).
    let (dx, dy) = area.get_base_pixel();
    for (i, b) in bars.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        let label = centered(15).pos(Pos::new(HPos::Center, VPos::Top));
        area.draw(&Text::new(
            b.runtime.clone(),
            (x - dx, y - dy + 6),
            label.clone(),
        ))
        .map_err(draw_error)?;
        area.draw(&Text::new(
            b.precision.clone(),
            (x - dx, y - dy + 22),
            label,
        ))
        .map_err(draw_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Decode, Memory, Roofline, Stats};

    fn record(runtime: &str, variant: &str, tok_s: f64, peak: Option<u64>) -> RunRecord {
        let stats = Stats::new(vec![tok_s]).unwrap();
        RunRecord {
            runtime: runtime.into(),
            variant: variant.into(),
            dtype: "bf16".into(),
            device: "dev".into(),
            model: "m".into(),
            versions: Default::default(),
            warmup: 0,
            reps: 1,
            load_s: 1.0,
            prefill: vec![],
            decode: Decode {
                prompt_tokens: 1,
                new_tokens: 2,
                batch: 1,
                tok_s: stats.clone(),
                tokens: vec![],
            },
            decode_variants: Vec::new(),
            memory: peak.map(|p| Memory {
                driver_peak_bytes: Some(p),
                ..Memory::default()
            }),
            roofline: (runtime == "glm-run").then(|| {
                Roofline::new(6_000_000_000, Stats::new(vec![3e12]).unwrap(), tok_s).unwrap()
            }),
            context_len: None,
            notes: vec![],
        }
    }

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_run_and_the_roofline() {
        let runs = vec![
            record("glm-run", "nf4-dq", 321.5, Some(6_400_000_000)),
            record("transformers", "nf4-dq", 14.25, Some(7_900_000_000)),
            record("transformers", "bf16", 11.0, None),
        ];
        let svg = svg(&runs, "glm-run vs transformers").unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // The SVG backend writes each text on its own line between <text ...> and </text>.
        let texts: Vec<&str> = svg
            .split("</text>")
            .filter_map(|t| Some(t.rsplit_once('>')?.1.trim()))
            .collect();
        for text in [
            "321.5",
            "14.2",
            "11.0",
            "6.40",
            "7.90",
            "transformers",
            "+bnb NF4",
            "glm-run",
            "NF4",
            "BF16",
        ] {
            assert!(
                texts.contains(&text),
                "no text {text} in the chart: {texts:?}"
            );
        }
        // 3 decode bars + 2 memory bars (the run without memory has none).
        let fill = |c: RGBColor| format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
        let count = |c: RGBColor| svg.matches(&fill(c)).count();
        assert_eq!(
            (count(OURS_NF4), count(PEER_NF4), count(PEER)),
            (2, 2, 1),
            "{svg}"
        );
        // The roofline of our run: 3e12 / 6e9 = 500 tok/s, drawn as a black line.
        assert_eq!(
            svg.matches("stroke=\"#000000\" stroke-width=\"2\"").count(),
            1
        );
    }

    #[test]
    fn a_panel_without_figures_says_so() {
        let svg = svg(&[record("transformers", "bf16", 11.0, None)], "t").unwrap();
        assert!(svg.contains("peak GPU memory, GB (driver): no figures"));
    }
}
