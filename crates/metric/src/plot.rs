//! Draws `error_distribution.png`: a histogram of the absolute errors of the joined pairs, with
//! their mean and median marked, so a person can see at a glance how wrong the model is and how
//! skewed its errors are.
//!
//! Pure Rust end to end: plotters draws into memory with an embedded DejaVu Sans (no system
//! fonts, no fontconfig or freetype) and the `image` crate encodes the PNG.

use anyhow::{Context as _, ensure};
use pipeline::fs::AtomicFile;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;
use std::sync::OnceLock;

/// DejaVu Sans, embedded so the picture looks the same on any machine (license in `assets/`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The family plotters asks for by default; registering ours under it covers every text.
const FAMILY: &str = "sans-serif";

/// Bars of the histogram.
const BINS: usize = 36;

/// Bounds of the picture's sides, in pixels: below, the text no longer fits; above, the buffer
/// gets huge (and plotters computes `width * height` in `u32`).
const MIN_SIDE: u32 = 200;
const MAX_SIDE: u32 = 8192;

const BAR: RGBColor = RGBColor(86, 140, 196);
const MEAN: RGBColor = RGBColor(213, 94, 0);
const MEDIAN: RGBColor = RGBColor(0, 0, 0);

/// Renders a histogram of `errors` (taken as absolute values) to a PNG at `path`, `width` by
/// `height` pixels, with the mean and the median marked and the number of values in the title.
///
/// The picture is drawn in memory and written to a hidden temporary file beside `path`
/// ([`pipeline::fs::AtomicFile`]), then synced and renamed over `path`, so a viewer sees either the old picture or the
/// new one, never half of one. Fails on an empty slice, on a value that is not finite and on a
/// side outside 200..=8192 pixels. CPU-bound (about 5 ms for 960x540 in a release build, half a
/// second in a debug one): from async code, call it in `spawn_blocking`.
pub fn render_error_histogram(
    errors: &[f64],
    path: &Path,
    width: u32,
    height: u32,
) -> anyhow::Result<()> {
    ensure!(
        !errors.is_empty(),
        "no errors to plot: the histogram needs at least one pair"
    );
    let bad = errors.iter().filter(|e| !e.is_finite()).count();
    ensure!(
        bad == 0,
        "{bad} of the {} errors are not finite numbers",
        errors.len()
    );
    ensure!(
        (MIN_SIDE..=MAX_SIDE).contains(&width) && (MIN_SIDE..=MAX_SIDE).contains(&height),
        "a {width}x{height} picture is out of bounds: each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
    );
    // A hidden `.<name>.<random>.png` beside `path`: same folder, so the rename is atomic; ends
    // in `.png`, so the encoder picks PNG; hidden, so a glob for `*.png` skips it.
    let tmp = AtomicFile::with_suffix(path, ".png")?;
    install_font()?;

    let errors: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
    let summary = Summary::of(&errors);
    // plotters keeps the pixels in memory and encodes them to `tmp` only when presented: the
    // same as `with_buffer` plus an encoder, without a second PNG dependency. On any error `tmp`
    // is deleted when it drops.
    draw(&summary, tmp.temp_path(), width, height)?;
    tmp.commit()?;
    Ok(())
}

/// The median of `values`, the mean of the two middle ones for an even count; `None` when empty.
/// Orders by [`f64::total_cmp`], so a NaN does not panic (it sorts beyond the numbers).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut values = values.to_vec();
    let n = values.len();
    let (below, &mut upper, _) = values.select_nth_unstable_by(n / 2, f64::total_cmp);
    if n % 2 == 1 {
        return Some(upper);
    }
    let lower = below.iter().copied().max_by(f64::total_cmp)?;
    // Halving the gap, unlike halving the sum, cannot overflow.
    Some(lower + (upper - lower) / 2.0)
}

/// What the picture (and the dashboard's histogram) shows, computed from the absolute errors.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Errors counted.
    pub count: usize,
    /// Their mean.
    pub mean: f64,
    /// Their median.
    pub median: f64,
    /// Right end of the x axis: the largest error, or 1 when all are 0.
    pub upper: f64,
    /// Counts of `BINS` equal bins from 0 to `upper`.
    pub bins: Vec<u64>,
}

impl Summary {
    /// The summary of `errors` (absolute values).
    pub fn of(errors: &[f64]) -> Self {
        let (count, mean, upper, bins) = histogram(errors.iter());
        Self {
            count,
            mean,
            median: median(errors).unwrap_or(0.0),
            upper,
            bins,
        }
    }
}

/// Count, mean, right end of the x axis and the [`BINS`] counts of the absolute `errors`, without
/// copying them (the dashboard calls it every second on the last `PLOT_MAX_PAIRS` errors).
pub fn histogram<'e>(errors: impl Iterator<Item = &'e f64> + Clone) -> (usize, f64, f64, Vec<u64>) {
    let max = errors.clone().copied().fold(0.0, f64::max);
    let upper = if max > 0.0 { max } else { 1.0 };
    let mut bins = vec![0u64; BINS];
    let mut count = 0;
    // A running mean cannot overflow where a sum of huge errors would.
    let mut mean = 0.0;
    for &e in errors {
        // Scaling by `upper` rather than dividing by the bin width keeps subnormal maxima exact.
        let bin = (e / upper * BINS as f64) as usize;
        bins[bin.min(BINS - 1)] += 1;
        count += 1;
        mean += (e - mean) / count as f64;
    }
    (count, mean, upper, bins)
}

/// Draws the chart into memory and encodes it to `tmp` (a `.png`: the encoder goes by the
/// extension).
fn draw(s: &Summary, tmp: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    // Text scales with the picture; the 16:9-equivalent height keeps wide pictures sane.
    let unit = f64::from(height.min(width.saturating_mul(9) / 16));
    let title_size = even((unit / 22.0).clamp(12.0, 60.0));
    let label_size = even((unit / 38.0).clamp(10.0, 36.0));
    let desc_size = even((unit / 32.0).clamp(12.0, 42.0));
    let legend_size = even(label_size * 1.1);
    let line_width = (unit / 270.0).clamp(2.0, 8.0) as u32;

    let tallest = s.bins.iter().copied().max().unwrap_or(0);
    // Headroom above the tallest bar for the legend.
    let y_top = tallest + tallest / 6 + 1;
    let y_digits = group_thousands(y_top).len() as f64;

    let root = BitMapBackend::new(tmp, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.margin(
        (unit / 60.0) as u32,
        (unit / 60.0) as u32,
        (unit / 60.0) as u32,
        (unit / 25.0) as u32,
    );
    let title = format!(
        "Absolute error of {} prediction{}",
        group_thousands(s.count as u64),
        if s.count == 1 { "" } else { "s" }
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, title_size))
        .x_label_area_size(label_size * 1.6 + desc_size * 1.6)
        .y_label_area_size(label_size * (0.65 * y_digits + 0.8) + desc_size * 1.6)
        // A little room right of the last bar, so lines at the largest error stay visible.
        .build_cartesian_2d(0.0..(s.upper + s.upper / 50.0).min(f64::MAX), 0..y_top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels((f64::from(width) / (label_size * 7.0)).clamp(3.0, 10.0) as usize)
        .y_labels((f64::from(height) / (label_size * 4.0)).clamp(3.0, 8.0) as usize)
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.12))
        .x_label_formatter(&|v| format_value(*v))
        .y_label_formatter(&|n| group_thousands(*n))
        .label_style((FAMILY, label_size))
        .axis_desc_style((FAMILY, desc_size))
        .x_desc("absolute error")
        .y_desc("pairs")
        .draw()?;

    let step = s.upper / BINS as f64;
    chart.draw_series(
        s.bins
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, &n)| {
                let mut bar = Rectangle::new(
                    [(step * i as f64, 0), (step * (i + 1) as f64, n)],
                    BAR.filled(),
                );
                // A pixel of white between neighbours keeps the bars apart.
                bar.set_margin(0, 0, 1, 0);
                bar
            }),
    )?;

    let mean_style = MEAN.stroke_width(line_width);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(s.mean, 0), (s.mean, y_top)],
            mean_style,
        )))?
        .label(format!("mean {}", format_value(s.mean)))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], mean_style));
    let median_style = MEDIAN.stroke_width(line_width);
    let dash = (unit / 60.0).max(4.0) as u32;
    chart
        .draw_series(std::iter::once(DashedPathElement::new(
            vec![(s.median, 0), (s.median, y_top)],
            dash,
            dash / 2 + 1,
            median_style,
        )))?
        .label(format!("median {}", format_value(s.median)))
        .legend(move |(x, y)| {
            DashedPathElement::new(vec![(x, y), (x + 24, y)], 6, 3, median_style)
        });
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, legend_size))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .draw()?;

    root.present()
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok(())
}

/// Registers the embedded font with plotters, once per process.
fn install_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the embedded font DejaVuSans.ttf cannot be parsed");
    Ok(())
}

/// About four significant digits, without trailing zeros; scientific beyond 1e-3..1e6.
fn format_value(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.3e}");
        return match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
            None => s,
        };
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Rounds a font size to an even number of pixels: plotters' ab_glyph text puts the baseline at
/// half the size and truncates, so an odd size shifts some glyphs (a `.` looks like a `·`).
fn even(size: f64) -> f64 {
    (size / 2.0).round() * 2.0
}

/// 1234567 as "1,234,567".
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(bytes.len() > 24, "too short for a PNG");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    /// Deterministic, roughly |N(0, 50)|: the sum of uniforms is near normal.
    fn sample_errors(n: usize) -> Vec<f64> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let z: f64 = (0..12).map(|_| uniform()).sum::<f64>() - 6.0;
                (z * 50.0).abs()
            })
            .collect()
    }

    #[test]
    fn renders_a_png_of_the_requested_size_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("error_distribution.png");
        render_error_histogram(&sample_errors(1000), &path, 640, 360).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), (640, 360));
        // Again over the existing picture, at another size.
        render_error_histogram(&sample_errors(10), &path, 800, 600).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), (800, 600));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["error_distribution.png"]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777 & !0o022, 0o644, "mode {mode:o}");
    }

    #[test]
    fn odd_inputs_render_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.png");
        let cases: [&[f64]; 8] = [
            &[0.0],
            &[0.0; 50],
            &[7.5; 3],
            &[-3.0, 2.0, -1.0],
            &[1e-320, 5e-324],
            &[1e300, 1.0],
            &[f64::MAX, f64::MAX],
            &[f64::MIN_POSITIVE],
        ];
        for errors in cases {
            render_error_histogram(errors, &path, MIN_SIDE, MIN_SIDE)
                .unwrap_or_else(|e| panic!("{errors:?}: {e:#}"));
            assert_eq!(png_size(&std::fs::read(&path).unwrap()), (200, 200));
        }
    }

    #[test]
    fn empty_non_finite_and_bad_sizes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.png");
        let err = render_error_histogram(&[], &path, 640, 360).unwrap_err();
        assert!(err.to_string().contains("no errors"), "{err}");
        assert!(render_error_histogram(&[1.0, f64::NAN], &path, 640, 360).is_err());
        assert!(render_error_histogram(&[f64::INFINITY], &path, 640, 360).is_err());
        assert!(render_error_histogram(&[1.0], &path, 0, 360).is_err());
        assert!(render_error_histogram(&[1.0], &path, 640, 100_000).is_err());
        assert!(render_error_histogram(&[1.0], Path::new("/"), 640, 360).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("e.png");
        assert!(render_error_histogram(&[1.0], &path, 640, 360).is_err());
    }

    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[4.0]), Some(4.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0, 5.0, 1.0, 9.0, 5.0, 0.0]), Some(5.0));
        assert_eq!(median(&[f64::MAX, f64::MAX]), Some(f64::MAX));
    }

    #[test]
    fn summary_bins_cover_every_value() {
        let s = Summary::of(&[0.0, 1.0, 2.0, 10.0]);
        assert_eq!(s.bins.iter().sum::<u64>(), 4);
        assert_eq!(s.bins[0], 1);
        assert_eq!(s.bins[BINS - 1], 1);
        assert_eq!(s.mean, 3.25);
        assert_eq!(s.median, 1.5);
        assert_eq!(Summary::of(&[0.0, 0.0]).upper, 1.0);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1234), "1,234");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(39.8712), "39.87");
        assert_eq!(format_value(40.0), "40");
        assert_eq!(format_value(0.30000000000000004), "0.3");
        assert_eq!(format_value(1234.6), "1235");
        assert_eq!(format_value(2.5e7), "2.5e7");
        assert_eq!(format_value(1e-5), "1e-5");
    }

    /// Writes /tmp/error_distribution_sample.png to look at: `cargo test -p metric plot --
    /// --ignored`.
    #[test]
    #[ignore]
    fn sample_picture() {
        let path = Path::new("/tmp/error_distribution_sample.png");
        let started = std::time::Instant::now();
        render_error_histogram(&sample_errors(1000), path, 960, 540).unwrap();
        eprintln!("rendered in {:?}", started.elapsed());
    }
}
