//! `results.png`: throughput of every system per workload phase, as grouped bars on a log
//! scale (tmpfs and a cold far-link read differ by orders of magnitude), with the raw link as
//! a line. Drawn with plotters in this process, so a run needs no Python; text uses a TrueType
//! font from the system (Debian's fonts-dejavu-core, which `scripts/setup` installs), or the
//! file named by `LAKECACHE_BENCH_FONT`.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::plan::Workload;
use crate::report::Results;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn font_file() -> Option<PathBuf> {
    std::env::var_os("LAKECACHE_BENCH_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(FONTS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

fn register_font() -> anyhow::Result<()> {
    let path = font_file().context(
        "no TrueType font found (install fonts-dejavu-core or set LAKECACHE_BENCH_FONT)",
    )?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a font plotters can read", path.display()))
}

/// The bar groups: (label, workload, phase).
const GROUPS: &[(&str, Workload, &str)] = &[
    ("shards cold", Workload::Shards, "cold"),
    ("shards warm", Workload::Shards, "warm"),
    ("images cold", Workload::Images, "cold"),
    ("images warm", Workload::Images, "warm"),
    ("preload", Workload::Preload, ""),
    ("partial ep.2", Workload::Partial, "epoch 2"),
    ("partial ep.3", Workload::Partial, "epoch 3"),
];

pub fn draw(r: &Results, path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let systems: Vec<String> = r.plan.systems.iter().map(|s| s.label()).collect();
    let value = |sys: &str, w: Workload, phase: &str| {
        r.rows
            .iter()
            .find(|row| {
                row.system == sys && row.workload == w && (phase.is_empty() || row.phase == phase)
            })
            .map(|row| row.mb_s)
    };
    let groups: Vec<&(&str, Workload, &str)> = GROUPS
        .iter()
        .filter(|g| systems.iter().any(|s| value(s, g.1, g.2).is_some()))
        .collect();
    let mut all: Vec<f64> = groups
        .iter()
        .flat_map(|g| systems.iter().filter_map(|s| value(s, g.1, g.2)))
        .filter(|v| *v > 0.0)
        .collect();
    if let Some(raw) = &r.raw_link {
        all.push(raw.mb_s);
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        (
            10f64.powf((lo / 2.0).log10().floor()),
            10f64.powf((hi * 2.0).log10().ceil()),
        )
    } else {
        (0.1, 10.0)
    };
    let n = groups.len().max(1) as f64;
    let root = BitMapBackend::new(path, (1500, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "lakecache benchmark: {:?} profile, {:?} link ({} ms RTT, {} Mbit/s)",
        r.plan.profile,
        r.plan.link.name,
        r.plan.link.rtt_ms,
        r.plan.link.rate_bits / 1_000_000
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_desc("MB/s (log scale)")
        .label_style(("sans-serif", 16))
        .draw()?;
    let width = 0.8 / systems.len().max(1) as f64;
    for (si, sys) in systems.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(gi, g)| {
                let v = value(sys, g.1, g.2)?.max(lo);
                let x0 = gi as f64 + 0.1 + si as f64 * width;
                Some(Rectangle::new(
                    [(x0, lo), (x0 + width * 0.9, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(sys.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    if let Some(raw) = &r.raw_link {
        let v = raw.mb_s;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, v), (n, v)],
                BLACK.stroke_width(2),
            ))?
            .label(format!("raw link {v:.0} MB/s"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    // Group names under the axis, centred on their bars (drawn on the whole image, in pixels).
    let style =
        TextStyle::from(("sans-serif", 17).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (gi, g) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(gi as f64 + 0.5, lo));
        root.draw(&Text::new(g.0.to_string(), (x, y + 10), style.clone()))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.png");
        super::draw(&crate::report::tests::sample(), &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000);
    }
}
