//! SVG plots: per profile, downtime vs rows and migration time vs rows, one line per
//! method (like the thesis's figures 5.13-5.18).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::SummaryRow;

/// One line: method name, colour, (rows, seconds) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

const METHODS: [(&str, RGBColor); 3] = [
    ("migrate", BLUE),
    ("thesis", RED),
    ("floor", RGBColor(0, 140, 0)),
];

/// `metric` picks (mean, std) from a summary row; floor rows (profile "local") are drawn
/// in every profile's downtime plot.
pub fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    profile: &str,
    rows: &[SummaryRow],
    with_floor: bool,
    metric: fn(&SummaryRow) -> Option<f64>,
) -> Result<()> {
    let series: Vec<Series> = METHODS
        .iter()
        .filter(|(m, _)| with_floor || *m != "floor")
        .map(|(m, c)| {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| {
                    r.method == *m
                        && (r.profile == profile || (*m == "floor" && r.profile == "local"))
                })
                .filter_map(|r| metric(r).map(|v| (r.rows as f64, v)))
                .collect();
            (*m, *c, pts)
        })
        .filter(|(_, _, p)| !p.is_empty())
        .collect();
    draw(
        path,
        title,
        "rows in app.users (log scale)",
        y_label,
        series,
    )
}

/// Draws `series` (lines with points) on a log-scale x axis.
fn draw(path: &Path, title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    let xs = series.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let (xmin, xmax) = if xmin >= xmax {
        (xmin / 2.0, xmax * 2.0)
    } else {
        (xmin / 1.3, xmax * 1.3)
    };
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        * 1.2;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };

    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (name, color, pts) in series {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// A value of a summary row, for one axis of a series plot.
type Metric = fn(&SummaryRow) -> Option<f64>;

/// One line per metric over the cells of `method` in `profile`, x from `x`; `extra`
/// lines are drawn after them.
#[allow(clippy::too_many_arguments)]
fn cells_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    rows: &[SummaryRow],
    (method, profile): (&str, &str),
    x: Metric,
    metrics: &[(&'static str, RGBColor, Metric)],
    extra: impl Fn(&[&SummaryRow]) -> Vec<Series<'static>>,
) -> Result<()> {
    let cells: Vec<&SummaryRow> = rows
        .iter()
        .filter(|r| r.method == method && r.profile == profile)
        .collect();
    let series: Vec<Series> = metrics
        .iter()
        .map(|(name, color, f)| {
            let pts = cells.iter().filter_map(|r| Some((x(r)?, f(r)?))).collect();
            (*name, *color, pts)
        })
        .chain(extra(&cells))
        .filter(|s| !s.2.is_empty())
        .collect();
    draw(path, title, x_label, "seconds", series)
}

/// Downtime against the memory the hog holds (method memory), for one profile, with
/// the two parts that grow with it: archives complete after DOWN, and the restore; and,
/// when the link was measured, the time the archive needs on it.
pub fn plot_memory(
    path: &Path,
    title: &str,
    profile: &str,
    rows: &[SummaryRow],
    link: Option<f64>,
) -> Result<()> {
    cells_plot(
        path,
        title,
        "MiB of touched memory held by the process (log scale)",
        rows,
        ("memory", profile),
        |r| Some(r.rows as f64),
        &[
            ("downtime", BLUE, |r| r.downtime_mean_s),
            (
                "archives complete (after DOWN)",
                RGBColor(230, 120, 0),
                |r| r.checkpoint_mean_s,
            ),
            ("restore on the target", RGBColor(0, 140, 0), |r| {
                r.restore_mean_s
            }),
        ],
        |cells| {
            let Some(rate) = link else {
                return Vec::new();
            };
            let pts = cells
                .iter()
                .filter_map(|r| Some((r.rows as f64, r.archive_mean_bytes? / rate)))
                .collect();
            vec![(
                "link needs (archive ÷ SSH throughput)",
                RGBColor(120, 120, 120),
                pts,
            )]
        },
    )
}

/// The data series, for one profile: downtime against the size of the data folder, with
/// the pre-sync (before DOWN, grows with the data) and the post-sync (while down).
pub fn plot_data(path: &Path, title: &str, profile: &str, rows: &[SummaryRow]) -> Result<()> {
    cells_plot(
        path,
        title,
        "MiB in the data folder moved with the thesis pair (log scale)",
        rows,
        ("data", profile),
        |r| r.data_mean_bytes.map(|b| b / 1048576.0),
        &[
            ("downtime", BLUE, |r| r.downtime_mean_s),
            ("post-sync (while down)", RGBColor(230, 120, 0), |r| {
                r.postsync_mean_s
            }),
            ("pre-sync (before DOWN)", RGBColor(0, 140, 0), |r| {
                r.presync_mean_s
            }),
        ],
        |_| Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(method: &str, rows: u64, downtime: f64) -> SummaryRow {
        SummaryRow {
            method: method.into(),
            profile: "lan".into(),
            rows,
            downtime_mean_s: Some(downtime),
            checkpoint_mean_s: Some(downtime / 2.0),
            restore_mean_s: Some(downtime / 2.0),
            postsync_mean_s: Some(0.1),
            presync_mean_s: Some(rows as f64 / 100.0 + 1.0),
            archive_mean_bytes: Some((rows << 20) as f64),
            data_mean_bytes: Some(((rows + 170) << 20) as f64),
            ..Default::default()
        }
    }

    #[test]
    fn series_plots_draw_their_lines() {
        let dir = std::env::temp_dir().join(format!("bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = vec![
            cell("memory", 64, 1.2),
            cell("memory", 1024, 14.0),
            cell("data", 0, 1.0),
            cell("data", 1024, 1.1),
            cell("migrate", 1000, 1.0),
        ];
        let mem = dir.join("m.svg");
        plot_memory(&mem, "Memory", "lan", &rows, Some(300.0 * 1048576.0)).unwrap();
        let text = std::fs::read_to_string(&mem).unwrap();
        for label in [
            "downtime",
            "archives complete",
            "restore on the target",
            "link needs",
        ] {
            assert!(text.contains(label), "memory plot lacks {label}");
        }
        plot_memory(&mem, "Memory", "lan", &rows, None).unwrap();
        assert!(
            !std::fs::read_to_string(&mem)
                .unwrap()
                .contains("link needs")
        );
        let data = dir.join("d.svg");
        plot_data(&data, "Data", "lan", &rows).unwrap();
        let text = std::fs::read_to_string(&data).unwrap();
        for label in [
            "downtime",
            "post-sync (while down)",
            "pre-sync (before DOWN)",
        ] {
            assert!(text.contains(label), "data plot lacks {label}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
