//! SVG plots: per profile, downtime vs rows and migration time vs rows, one line per
//! method (like the thesis's figures 5.13-5.18), and the memory and data series. Each
//! point is the mean of a cell's valid runs, with a bar from their minimum to their
//! maximum; the x axis has a tick at each measured x and nowhere else.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::report::RunRow;
use crate::stats::stats;

/// A value of one run, for one axis.
type Metric<'a> = &'a dyn Fn(&RunRow) -> Option<f64>;

/// One cell on a line: x, and the mean, minimum and maximum of its valid runs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    x: f64,
    mean: f64,
    min: f64,
    max: f64,
}

/// One line: its name, colour and points.
type Series = (String, RGBColor, Vec<Point>);

const METHODS: [(&str, RGBColor); 4] = [
    ("migrate", BLUE),
    ("migrate-copy", RGBColor(230, 120, 0)),
    ("thesis", RED),
    ("floor", RGBColor(0, 140, 0)),
];
const ORANGE: RGBColor = RGBColor(230, 120, 0);
const GREEN: RGBColor = RGBColor(0, 140, 0);
const GREY: RGBColor = RGBColor(120, 120, 120);

/// Every plot of a result set: for each profile, downtime and migration time against
/// rows and, where the runs hold them, the memory and data series. `links` holds the
/// rate SSH alone carried per profile (bytes/s), for the memory plot's `link needs`.
pub fn write_plots(
    out: &Path,
    profiles: &[String],
    runs: &[RunRow],
    links: &BTreeMap<String, f64>,
) -> Result<()> {
    let has = |m: &str| runs.iter().any(|r| r.method == m);
    for p in profiles {
        plot_rows(
            &out.join(format!("downtime-{p}.svg")),
            &format!("Downtime vs rows, profile {p}"),
            "downtime (s)",
            p,
            runs,
            true,
            &|r| r.downtime_s,
        )?;
        if has("memory") {
            plot_memory(
                &out.join(format!("downtime-memory-{p}.svg")),
                &format!("Downtime vs memory held, profile {p}"),
                p,
                runs,
                links.get(p).copied(),
            )?;
        }
        if has("data") {
            plot_data(
                &out.join(format!("downtime-data-{p}.svg")),
                &format!("Downtime vs data folder size, profile {p}"),
                p,
                runs,
            )?;
        }
        plot_rows(
            &out.join(format!("migration-{p}.svg")),
            &format!("Migration time vs rows, profile {p}"),
            "migration time (s)",
            p,
            runs,
            false,
            &|r| r.migration_time_s,
        )?;
    }
    Ok(())
}

/// The cells of `method` in `profile`, one point per rows value over its valid runs;
/// the floor, measured on one host (profile "local"), belongs to every profile.
fn points(runs: &[RunRow], method: &str, profile: &str, x: Metric, y: Metric) -> Vec<Point> {
    let mut cells: BTreeMap<u64, Vec<&RunRow>> = BTreeMap::new();
    for r in runs.iter().filter(|r| {
        r.valid()
            && r.method == method
            && (r.profile == profile || (method == "floor" && r.profile == "local"))
    }) {
        cells.entry(r.rows).or_default().push(r);
    }
    let mut pts: Vec<Point> = cells
        .values()
        .filter_map(|rs| {
            let xs = stats(&rs.iter().filter_map(|r| x(r)).collect::<Vec<_>>())?;
            let ys = stats(&rs.iter().filter_map(|r| y(r)).collect::<Vec<_>>())?;
            Some(Point {
                x: xs.mean,
                mean: ys.mean,
                min: ys.min,
                max: ys.max,
            })
        })
        .collect();
    pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    pts
}

/// One line per method against rows; the floor only where `with_floor`.
fn plot_rows(
    path: &Path,
    title: &str,
    y_label: &str,
    profile: &str,
    runs: &[RunRow],
    with_floor: bool,
    metric: Metric,
) -> Result<()> {
    let series: Vec<Series> = METHODS
        .iter()
        .filter(|(m, _)| with_floor || *m != "floor")
        .map(|(m, c)| {
            let pts = points(runs, m, profile, &|r| Some(r.rows as f64), metric);
            (m.to_string(), *c, pts)
        })
        .collect();
    draw(
        path,
        title,
        "rows in app.users (log scale)",
        y_label,
        series,
    )
}

/// Downtime against the memory the hog holds (method memory), for one profile, with
/// the two parts that grow with it: archives complete after DOWN, and the restore; and,
/// when the link was measured, the time the archive needs on it.
fn plot_memory(
    path: &Path,
    title: &str,
    profile: &str,
    runs: &[RunRow],
    link: Option<f64>,
) -> Result<()> {
    let x: Metric = &|r| Some(r.rows as f64);
    let line = |name: &str, color, y: Metric| {
        (
            name.to_string(),
            color,
            points(runs, "memory", profile, x, y),
        )
    };
    let lazy = |name: &str, color, y: Metric| {
        (name.to_string(), color, points(runs, "lazy", profile, x, y))
    };
    let mut series = vec![
        line("downtime (copy)", BLUE, &|r| r.downtime_s),
        lazy("downtime (lazy)", RED, &|r| r.downtime_s),
        lazy("post-copy window (lazy)", RGBColor(150, 0, 150), &|r| {
            r.postcopy_s
        }),
        line("archives complete (after DOWN)", ORANGE, &|r| {
            r.checkpoint_s
        }),
        line("restore on the target", GREEN, &|r| r.restore_s),
    ];
    if let Some(rate) = link {
        series.push(line("link needs (archive ÷ SSH throughput)", GREY, &|r| {
            Some(r.archive_bytes? / rate)
        }));
    }
    draw(
        path,
        title,
        "MiB of touched memory held by the process (log scale)",
        "seconds",
        series,
    )
}

/// The data series, for one profile: downtime against the size of the data folder, with
/// the pre-sync (before DOWN, grows with the data) and the post-sync (while down).
fn plot_data(path: &Path, title: &str, profile: &str, runs: &[RunRow]) -> Result<()> {
    let x: Metric = &|r| r.data_bytes.map(|b| b / 1048576.0);
    let line = |name: &str, color, y: Metric| {
        (name.to_string(), color, points(runs, "data", profile, x, y))
    };
    let series = vec![
        line("downtime", BLUE, &|r| r.downtime_s),
        line("post-sync (while down)", ORANGE, &|r| r.postsync_s),
        line("pre-sync (before DOWN)", GREEN, &|r| r.presync_s),
    ];
    draw(
        path,
        title,
        "MiB in the data folder moved with the thesis pair (log scale)",
        "seconds",
        series,
    )
}

/// The measured x values, each once, for the axis's ticks.
fn ticks(series: &[Series]) -> Vec<f64> {
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.x))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() <= 1e-9 * b.abs().max(1.0));
    xs
}

/// A tick label: whole numbers as such, smaller values with two significant digits.
fn tick_label(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Draws `series` on a log-scale x axis: lines through the means, a dot at each mean and
/// a bar from minimum to maximum. Writes nothing when there is no point.
fn draw(path: &Path, title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Result<()> {
    let series: Vec<Series> = series.into_iter().filter(|s| !s.2.is_empty()).collect();
    let xs = ticks(&series);
    let (Some(&first), Some(&last)) = (xs.first(), xs.last()) else {
        return Ok(());
    };
    let (xmin, xmax) = if first >= last {
        (first / 2.0, last * 2.0)
    } else {
        (first / 1.3, last * 1.3)
    };
    // Room above the highest bar for the legend (about 16 pixels a line, 24 of frame, in
    // a plotting area about 390 pixels high), so that it covers no bar.
    let legend = (16.0 * series.len() as f64 + 24.0) / 390.0;
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.max))
        .fold(0.0f64, f64::max)
        / (1.0 - legend);
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };

    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (xmin..xmax).log_scale().with_key_points(xs.clone()),
            0.0..ymax,
        )
        .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(format!("{y_label}; bars: min–max of the valid runs"))
        .x_label_formatter(&|x| tick_label(*x))
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    // Lines sharing an x are moved apart by 8 pixels each, so that their bars do not
    // cover each other: on a log axis that is a factor on x.
    let width = f64::from(chart.plotting_area().dim_in_pixel().0.max(1));
    let n = series.len() as f64;
    for (i, (name, color, pts)) in series.into_iter().enumerate() {
        let shift = (xmax / xmin).powf(8.0 * (i as f64 - (n - 1.0) / 2.0) / width);
        let pts: Vec<Point> = pts
            .iter()
            .map(|p| Point {
                x: p.x * shift,
                ..*p
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.x, p.mean)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        let bar = color.stroke_width(1);
        let cap = |x: f64, y: f64| {
            EmptyElement::at((x, y)) + PathElement::new(vec![(-4, 0), (4, 0)], bar)
        };
        chart
            .draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.x, p.min), (p.x, p.max)], bar)),
            )
            .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
        chart
            .draw_series(pts.iter().flat_map(|p| [cap(p.x, p.min), cap(p.x, p.max)]))
            .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.x, p.mean), 4, color.filled())),
            )
            .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("drawing {}: {e:?}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, rows: u64, downtime: f64) -> RunRow {
        RunRow {
            method: method.into(),
            profile: "lan".into(),
            rows,
            outcome: "ok".into(),
            downtime_s: Some(downtime),
            migration_time_s: Some(downtime * 3.0),
            checkpoint_s: Some(downtime / 2.0),
            restore_s: Some(downtime / 2.0),
            postsync_s: Some(0.1),
            presync_s: Some(rows as f64 / 100.0 + 1.0),
            archive_bytes: Some((rows << 20) as f64),
            data_bytes: Some(((rows + 170) << 20) as f64),
            ..Default::default()
        }
    }

    #[test]
    fn a_point_is_the_mean_of_valid_runs_with_their_range() {
        let mut bad = run("migrate", 1000, 50.0);
        bad.outcome = "state_lost".into();
        let mut floor = run("floor", 1000, 2.0);
        floor.profile = "local".into();
        let runs = vec![
            run("migrate", 1000, 1.0),
            run("migrate", 1000, 3.0),
            run("migrate", 1000, 2.0),
            bad,
            run("migrate", 100, 0.5),
            floor,
        ];
        let y: Metric = &|r| r.downtime_s;
        let x: Metric = &|r| Some(r.rows as f64);
        let pts = points(&runs, "migrate", "lan", x, y);
        assert_eq!(
            pts,
            vec![
                Point {
                    x: 100.0,
                    mean: 0.5,
                    min: 0.5,
                    max: 0.5
                },
                Point {
                    x: 1000.0,
                    mean: 2.0,
                    min: 1.0,
                    max: 3.0
                },
            ]
        );
        assert_eq!(points(&runs, "floor", "wan", x, y).len(), 1);
        assert!(points(&runs, "thesis", "lan", x, y).is_empty());
    }

    #[test]
    fn ticks_are_the_measured_values_once() {
        let p = |x| Point {
            x,
            mean: 1.0,
            min: 1.0,
            max: 1.0,
        };
        let s = vec![
            ("a".to_string(), BLUE, vec![p(10000.0), p(1000.0)]),
            ("b".to_string(), RED, vec![p(1000.0), p(100.0)]),
        ];
        assert_eq!(ticks(&s), vec![100.0, 1000.0, 10000.0]);
        assert_eq!(tick_label(1024.0), "1024");
        assert_eq!(tick_label(0.5), "0.50");
    }

    #[test]
    fn plots_draw_their_lines_and_bars() {
        let dir = std::env::temp_dir().join(format!("bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = vec![
            run("memory", 64, 1.2),
            run("memory", 64, 1.4),
            run("memory", 1024, 14.0),
            run("data", 0, 1.0),
            run("data", 1024, 1.1),
            run("migrate", 1000, 1.0),
            run("migrate", 1000, 1.5),
            run("thesis", 1000, 3.5),
        ];
        let links = BTreeMap::from([("lan".to_string(), 300.0 * 1048576.0)]);
        write_plots(&dir, &["lan".to_string()], &runs, &links).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let mem = read("downtime-memory-lan.svg");
        for label in [
            "downtime",
            "archives complete",
            "restore on the target",
            "link needs",
            "min–max",
            "\n64\n",
            "\n1024\n",
        ] {
            assert!(mem.contains(label), "memory plot lacks {label}");
        }
        // Tick labels (each on a line of its own in the SVG) only at measured values.
        assert!(
            !mem.contains("\n100\n"),
            "memory plot has an unmeasured tick"
        );
        let data = read("downtime-data-lan.svg");
        for label in [
            "downtime",
            "post-sync (while down)",
            "pre-sync (before DOWN)",
        ] {
            assert!(data.contains(label), "data plot lacks {label}");
        }
        let down = read("downtime-lan.svg");
        assert!(down.contains("migrate") && down.contains("thesis"));
        // No link measured: no such line.
        write_plots(&dir, &["lan".to_string()], &runs, &BTreeMap::new()).unwrap();
        assert!(!read("downtime-memory-lan.svg").contains("link needs"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
