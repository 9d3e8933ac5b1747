//! Figures drawn with plotters: the reset heatmap (the paper's figure) and the movement curves,
//! rendered to SVG text and to PNG bytes from the same drawing code.
//!
//! Text is set in DejaVu Sans, bundled with the library and registered from bytes, so that PNGs
//! render the same on a machine without system fonts. SVGs name the family `sans-serif` and let
//! the viewer pick its own.

use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

/// DejaVu Sans 2.37 (Bitstream Vera license, see `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the bundled font DejaVuSans.ttf could not be loaded");
    }
    Ok(())
}

/// Turns a plotters error (whose types differ per backend) into an anyhow error.
fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

fn font(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

fn text_width(text: &str, size: u32) -> Result<u32> {
    ensure_font()?;
    let (w, _) = (FAMILY, size).into_font().box_size(text).map_err(drawing)?;
    Ok(w)
}

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    fn size(&self) -> Result<(u32, u32)>;
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

/// The figure as SVG text.
pub fn svg<F: Figure>(figure: &F) -> Result<String> {
    ensure_font()?;
    let size = figure.size()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        figure.draw(&root)?;
        root.present().map_err(drawing)?;
    }
    Ok(out)
}

/// The figure as PNG bytes (8-bit RGB).
pub fn png<F: Figure>(figure: &F) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = figure.size()?;
    let mut pixels = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        figure.draw(&root)?;
        root.present().map_err(drawing)?;
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = ::png::Encoder::new(&mut bytes, w, h);
        encoder.set_color(::png::ColorType::Rgb);
        encoder.set_depth(::png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
    }
    Ok(bytes)
}

/// Colours for errors from 0 (pale) to the chance level (black): matplotlib's "magma", reversed,
/// which is perceptually uniform and prints readably in grey.
const MAGMA_R: [(u8, u8, u8); 9] = [
    (252, 253, 191),
    (254, 194, 135),
    (251, 135, 97),
    (229, 89, 100),
    (181, 54, 122),
    (129, 37, 129),
    (79, 18, 123),
    (28, 16, 68),
    (0, 0, 4),
];

/// The colour of a value on a 0 ..= `vmax` scale (values outside are clamped).
pub fn colour(value: f64, vmax: f64) -> RGBColor {
    let t = if vmax > 0.0 { (value / vmax).clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (MAGMA_R.len() - 1) as f64;
    let i = (x.floor() as usize).min(MAGMA_R.len() - 2);
    let f = x - i as f64;
    let (a, b) = (MAGMA_R[i], MAGMA_R[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + f * (q as f64 - p as f64)).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The colour bar's tick spacing: the finest step at least 26 pixels apart and at most ten
/// intervals over the bar, preferring steps that
/// end exactly at `vmax` (0.3 for a 0.9 scale) so that the top of the bar is labelled.
fn tick_step(vmax: f64, bar_h: i32) -> f64 {
    const STEPS: [f64; 8] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.45, 0.5];
    let fits = |s: f64| vmax / s <= (bar_h as f64 / 26.0).min(10.0);
    let divides = |s: f64| ((vmax / s) - (vmax / s).round()).abs() < 1e-9;
    STEPS
        .into_iter()
        .find(|&s| fits(s) && divides(s))
        .or_else(|| STEPS.into_iter().find(|&s| fits(s)))
        .unwrap_or(if vmax > 0.0 { vmax } else { 1.0 })
}

/// Black or white, whichever reads better on `bg`.
fn ink_on(bg: RGBColor) -> RGBColor {
    let luma = 0.299 * bg.0 as f64 + 0.587 * bg.1 as f64 + 0.114 * bg.2 as f64;
    if luma > 140.0 {
        BLACK
    } else {
        WHITE
    }
}

/// A grid of values, one row per unit (input at the top), one column per reset.
#[derive(Debug, Clone)]
pub struct Heatmap {
    pub title: String,
    pub subtitle: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    /// A visual gap after this many columns (re-randomization apart from the checkpoints).
    pub gap_after: Option<usize>,
    /// `values[row][col]`; `None` where the reset was not run.
    pub values: Vec<Vec<Option<f64>>>,
    /// `critical[row][col]`: cells outlined as critical; empty when nothing is marked.
    pub critical: Vec<Vec<bool>>,
    /// The top of the colour scale (the chance-level error); the bottom is 0.
    pub vmax: f64,
    pub x_label: String,
    pub y_label: String,
    pub bar_label: String,
}

const CELL_W: i32 = 76;
const CELL_H: i32 = 40;
const GAP: i32 = 12;
const TITLE: u32 = 22;
const SUBTITLE: u32 = 15;
const LABEL: u32 = 16;
const CELL_TEXT: u32 = 15;

struct HeatLayout {
    left: i32,
    top: i32,
    gap: i32,
    bar_x: i32,
    width: u32,
    height: u32,
}

impl Heatmap {
    fn layout(&self) -> Result<HeatLayout> {
        let mut label_w = 0;
        for r in &self.rows {
            label_w = label_w.max(text_width(r, LABEL)? as i32);
        }
        let left = 16 + 24 + 10 + label_w + 10;
        let top = 86;
        let gap = if self.gap_after.is_some() { GAP } else { 0 };
        let grid_w = self.cols.len() as i32 * CELL_W + gap;
        let grid_h = self.rows.len() as i32 * CELL_H;
        let bar_x = left + grid_w + 28;
        let right = bar_x + 22 + 52 + 34;
        let title_w = text_width(&self.title, TITLE)?.max(text_width(&self.subtitle, SUBTITLE)?) as i32 + 40;
        let width = right.max(title_w);
        let height = top + grid_h + 78;
        Ok(HeatLayout { left, top, gap, bar_x, width: width as u32, height: height as u32 })
    }

    fn col_x(&self, lay: &HeatLayout, col: usize) -> i32 {
        let gap = match self.gap_after {
            Some(g) if col >= g => lay.gap,
            _ => 0,
        };
        lay.left + col as i32 * CELL_W + gap
    }
}

impl Figure for Heatmap {
    fn size(&self) -> Result<(u32, u32)> {
        let lay = self.layout()?;
        Ok((lay.width, lay.height))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let lay = self.layout()?;
        root.fill(&WHITE).map_err(drawing)?;
        let centre = Pos::new(HPos::Center, VPos::Center);
        let grid_w = self.col_x(&lay, self.cols.len()) - lay.left;
        let mid_x = lay.width as i32 / 2;
        root.draw(&Text::new(self.title.clone(), (mid_x, 26), font(TITLE).pos(centre))).map_err(drawing)?;
        root.draw(&Text::new(
            self.subtitle.clone(),
            (mid_x, 54),
            font(SUBTITLE).color(&RGBColor(70, 70, 70)).pos(centre),
        ))
        .map_err(drawing)?;

        for (r, name) in self.rows.iter().enumerate() {
            let y0 = lay.top + r as i32 * CELL_H;
            let right = Pos::new(HPos::Right, VPos::Center);
            root.draw(&Text::new(name.clone(), (lay.left - 10, y0 + CELL_H / 2), font(LABEL).pos(right)))
                .map_err(drawing)?;
            for c in 0..self.cols.len() {
                let x0 = self.col_x(&lay, c);
                let value = self.values.get(r).and_then(|row| row.get(c)).copied().flatten();
                let (bg, text) = match value {
                    Some(v) => (colour(v, self.vmax), format!("{:.1}", 100.0 * v)),
                    None => (RGBColor(225, 225, 225), "–".to_string()),
                };
                // One pixel of white around every cell draws the grid lines.
                root.draw(&Rectangle::new([(x0 + 1, y0 + 1), (x0 + CELL_W - 1, y0 + CELL_H - 1)], bg.filled()))
                    .map_err(drawing)?;
                let ink = ink_on(bg);
                if self.critical.get(r).and_then(|row| row.get(c)).copied().unwrap_or(false) {
                    let outline = RGBColor(0, 150, 220).stroke_width(3);
                    root.draw(&Rectangle::new([(x0 + 3, y0 + 3), (x0 + CELL_W - 3, y0 + CELL_H - 3)], outline))
                        .map_err(drawing)?;
                }
                root.draw(&Text::new(
                    text,
                    (x0 + CELL_W / 2, y0 + CELL_H / 2),
                    font(CELL_TEXT).color(&ink).pos(centre),
                ))
                .map_err(drawing)?;
            }
        }
        let bottom = lay.top + self.rows.len() as i32 * CELL_H;
        let top_centre = Pos::new(HPos::Center, VPos::Top);
        for (c, label) in self.cols.iter().enumerate() {
            let x = self.col_x(&lay, c) + CELL_W / 2;
            root.draw(&Text::new(label.clone(), (x, bottom + 8), font(LABEL).pos(top_centre))).map_err(drawing)?;
        }
        root.draw(&Text::new(self.x_label.clone(), (lay.left + grid_w / 2, bottom + 40), font(LABEL).pos(top_centre)))
            .map_err(drawing)?;
        let y_mid = lay.top + (bottom - lay.top) / 2;
        root.draw(&Text::new(
            self.y_label.clone(),
            (20, y_mid),
            font(LABEL).transform(FontTransform::Rotate270).pos(centre),
        ))
        .map_err(drawing)?;

        // Colour bar: the full scale from 0 (bottom) to vmax (top), beside the grid.
        let (bx, bw) = (lay.bar_x, 22);
        let bar_h = (bottom - lay.top).max(120);
        let (bar_top, bar_bottom) = (lay.top, lay.top + bar_h);
        let steps = 100;
        for i in 0..steps {
            let y1 = bar_bottom - (i * bar_h) / steps;
            let y0 = bar_bottom - ((i + 1) * bar_h) / steps;
            let v = self.vmax * (i as f64 + 0.5) / steps as f64;
            root.draw(&Rectangle::new([(bx, y0), (bx + bw, y1)], colour(v, self.vmax).filled())).map_err(drawing)?;
        }
        root.draw(&Rectangle::new([(bx, bar_top), (bx + bw, bar_bottom)], BLACK.stroke_width(1))).map_err(drawing)?;
        let tick = tick_step(self.vmax, bar_h);
        let n_ticks = (self.vmax / tick + 1e-9).floor() as i32;
        let left_mid = Pos::new(HPos::Left, VPos::Center);
        for k in 0..=n_ticks {
            let v = k as f64 * tick;
            let y = bar_bottom - ((v / self.vmax) * bar_h as f64).round() as i32;
            root.draw(&PathElement::new(vec![(bx + bw, y), (bx + bw + 5, y)], BLACK.stroke_width(1)))
                .map_err(drawing)?;
            let label = format!("{:.0}%", 100.0 * v);
            root.draw(&Text::new(label, (bx + bw + 8, y), font(14).pos(left_mid))).map_err(drawing)?;
        }
        root.draw(&Text::new(
            self.bar_label.clone(),
            (bx + bw + 62, bar_top + bar_h / 2),
            font(LABEL).transform(FontTransform::Rotate90).pos(centre),
        ))
        .map_err(drawing)?;
        Ok(())
    }
}

/// Line curves over epochs: one series per unit.
#[derive(Debug, Clone)]
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// One line of a [`Lines`] figure.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn in black and thicker (the whole network beside its units).
    pub emphasis: bool,
}

/// Matplotlib's "tab10", for the first ten series.
const TAB10: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn series_colour(i: usize) -> RGBColor {
    match TAB10.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

impl Figure for Lines {
    fn size(&self) -> Result<(u32, u32)> {
        // Taller for many units, so that the legend fits beside the plot.
        let h = 520.max(120 + 22 * self.series.len() as u32);
        Ok((900, h))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        root.fill(&WHITE).map_err(drawing)?;
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let x_max = points.clone().map(|p| p.0).fold(0.0, f64::max).max(1.0);
        let y_max = points.map(|p| p.1).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-3) * 1.08;
        // The legend gets its own strip on the right, so it never hides a curve.
        let mut legend_w = 40;
        for s in &self.series {
            legend_w = legend_w.max(40 + text_width(&s.name, 14)?);
        }
        let (w, _) = root.dim_in_pixel();
        let (plot_area, legend_area) = root.split_horizontally(w.saturating_sub(legend_w + 20));
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&self.title, font(20))
            .margin(18)
            .x_label_area_size(52)
            .y_label_area_size(76)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(font(14))
            .axis_desc_style(font(16))
            .bold_line_style(RGBColor(220, 220, 220))
            .light_line_style(TRANSPARENT)
            // Epochs are whole numbers: label only those.
            .x_label_formatter(&|x| if x.fract() == 0.0 { format!("{x:.0}") } else { String::new() })
            .draw()
            .map_err(drawing)?;
        let mut k = 0;
        let left_mid = Pos::new(HPos::Left, VPos::Center);
        for (i, series) in self.series.iter().enumerate() {
            let (name, pts) = (&series.name, &series.points);
            let (colour, width) = if series.emphasis {
                (BLACK, 3)
            } else {
                k += 1;
                (series_colour(k - 1), 2)
            };
            let style = colour.stroke_width(width);
            chart.draw_series(LineSeries::new(pts.iter().copied(), style)).map_err(drawing)?;
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(drawing)?;
            let y = 70 + 22 * i as i32;
            legend_area.draw(&PathElement::new(vec![(4, y), (28, y)], style)).map_err(drawing)?;
            legend_area.draw(&Circle::new((16, y), 3, colour.filled())).map_err(drawing)?;
            legend_area.draw(&Text::new(name.clone(), (36, y), font(14).pos(left_mid))).map_err(drawing)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Heatmap {
        let rows: Vec<String> = ["fc1", "fc2", "fc3", "fc4"].iter().map(|s| s.to_string()).collect();
        let cols: Vec<String> =
            ["rand.", "0", "1", "2", "3", "5", "10", "20", "40"].iter().map(|s| s.to_string()).collect();
        let values = (0..rows.len())
            .map(|r| {
                (0..cols.len())
                    .map(|c| if c == 4 && r == 3 { None } else { Some(0.9 * ((r * 9 + c) % 10) as f64 / 10.0) })
                    .collect()
            })
            .collect();
        Heatmap {
            title: "fcn-mnist: test error after resetting one unit".into(),
            subtitle: "mean over seeds 0, 1, 2 · baseline 1.9%".into(),
            rows,
            cols,
            gap_after: Some(1),
            values,
            critical: vec![vec![true; 9], vec![false; 9]],
            vmax: 0.9,
            x_label: "re-randomized | re-initialized to checkpoint τ (epoch)".into(),
            y_label: "unit".into(),
            bar_label: "test error".into(),
        }
    }

    #[test]
    fn colour_bar_ticks_are_readable() {
        assert_eq!(tick_step(0.9, 400), 0.1);
        assert_eq!(tick_step(0.9, 160), 0.15);
        assert_eq!(tick_step(0.9, 152), 0.3);
        assert_eq!(tick_step(0.9, 100), 0.3);
        assert_eq!(tick_step(0.9, 900), 0.1);
        assert_eq!(tick_step(0.5, 300), 0.05);
    }

    #[test]
    fn colour_scale_is_fixed_and_clamped() {
        assert_eq!(colour(0.0, 0.9), RGBColor(252, 253, 191));
        assert_eq!(colour(0.9, 0.9), RGBColor(0, 0, 4));
        assert_eq!(colour(2.0, 0.9), colour(0.9, 0.9));
        assert_eq!(colour(-1.0, 0.9), colour(0.0, 0.9));
        assert_eq!(ink_on(colour(0.0, 0.9)), BLACK);
        assert_eq!(ink_on(colour(0.9, 0.9)), WHITE);
    }

    #[test]
    fn heatmap_png_has_its_size_and_is_not_blank() {
        let h = sample();
        let (w, ht) = h.size().unwrap();
        let bytes = png(&h).unwrap();
        let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, ht));
        let pixels = &buf[..info.buffer_size()];
        let distinct: std::collections::HashSet<&[u8]> = pixels.chunks(3).collect();
        assert!(distinct.len() > 50, "only {} colours", distinct.len());
        // Text is drawn: some pure-black-ish pixels exist in the white margin above the grid.
        let row = 26 * w as usize * 3;
        assert!(pixels[row..row + w as usize * 3].chunks(3).any(|p| p[0] < 100), "no title ink");
    }

    #[test]
    fn heatmap_svg_is_well_formed_with_text() {
        let text = svg(&sample()).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        let texts: Vec<&str> =
            doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(str::trim).collect();
        assert!(texts.contains(&"fc1"));
        assert!(texts.iter().any(|t| t.contains("test error after resetting")));
        assert!(texts.contains(&"90%"));
        assert!(texts.contains(&"–"));
    }

    #[test]
    fn lines_render_in_both_formats() {
        let l = Lines {
            title: "movement".into(),
            x_label: "epoch".into(),
            y_label: "‖w − w₀‖ / ‖w₀‖".into(),
            series: vec![
                Series { name: "fc1".into(), points: vec![(0.0, 0.0), (1.0, 0.5)], emphasis: false },
                Series { name: "whole network".into(), points: vec![(0.0, 0.0), (1.0, 0.2)], emphasis: true },
            ],
        };
        roxmltree::Document::parse(&svg(&l).unwrap()).unwrap();
        assert!(png(&l).unwrap().starts_with(b"\x89PNG"));
    }
}
