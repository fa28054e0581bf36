//! The loss curve as a PNG (training loss in blue, evaluation loss as red dots), drawn
//! without a plotting dependency.

use std::path::Path;

use crate::error::{Result, TrainError};

const W: usize = 800;
const H: usize = 480;
const MARGIN: usize = 40;

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for s in 0..=steps {
            let x = x0 + (x1 - x0) * s / steps;
            let y = y0 + (y1 - y0) * s / steps;
            self.set(x, y, rgb);
            self.set(x, y + 1, rgb);
        }
    }

    fn dot(&mut self, (x, y): (i64, i64), rgb: [u8; 3]) {
        for dx in -3..=3 {
            for dy in -3..=3 {
                if dx * dx + dy * dy <= 9 {
                    self.set(x + dx, y + dy, rgb);
                }
            }
        }
    }
}

/// Reads `metrics.jsonl` and draws `loss` and `eval_loss` against `step` into `out`.
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Ok(());
    };
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    let all: Vec<(f64, f64)> = train
        .iter()
        .chain(&eval)
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let max_step = all.iter().map(|p| p.0).fold(1.0f64, f64::max);
    let lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1e-9);
    let to_px = |(s, l): (f64, f64)| -> (i64, i64) {
        let x = MARGIN as f64 + s / max_step * (W - 2 * MARGIN) as f64;
        let y = (H - MARGIN) as f64 - (l - lo) / span * (H - 2 * MARGIN) as f64;
        (x as i64, y as i64)
    };
    let mut c = Canvas::new();
    let grey = [120, 120, 120];
    c.line(
        (MARGIN as i64, MARGIN as i64),
        (MARGIN as i64, (H - MARGIN) as i64),
        grey,
    );
    c.line(
        (MARGIN as i64, (H - MARGIN) as i64),
        ((W - MARGIN) as i64, (H - MARGIN) as i64),
        grey,
    );
    for w in train.windows(2) {
        c.line(to_px(w[0]), to_px(w[1]), [31, 119, 180]);
    }
    for p in &eval {
        c.dot(to_px(*p), [214, 39, 40]);
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, W as u32, H as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| TrainError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        };
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(&c.pixels).map_err(png_err)?;
    }
    Ok(ember_lora::atomic::write_file(out, &bytes)?)
}
