//! `--plot PATH`: an SVG bar chart of how reactor-uring compares, per scenario, with
//! reactor-epoll, tokio and the best other peer or floor.
//!
//! Each bar is a speed-up: how many times faster reactor-uring is than the other system (above
//! one) or slower (below one), whatever the scenario's metric, so that all bars read the same
//! way. The axis is logarithmic, so 2× faster and 2× slower are the same length from the 1 line.

use plotters::prelude::*;

use crate::measure::{Metric, Summary};

/// reactor-uring's speed-up over `other` (> 1: reactor-uring is faster).
fn speedup(uring: &Summary, other: &Summary) -> f64 {
    match uring.metric {
        Metric::NsPerOp | Metric::Percent => other.median / uring.median,
        Metric::OpsPerSec | Metric::BytesPerSec => uring.median / other.median,
    }
}

/// The best system of a scenario that is neither reactor-uring, reactor-epoll nor tokio.
fn best_other<'a>(rows: &'a [Summary], scenario: &str) -> Option<&'a Summary> {
    rows.iter()
        .filter(|r| {
            r.scenario == scenario && !r.system.starts_with("reactor-") && r.system != "tokio"
        })
        .max_by(|a, b| {
            let key = |r: &Summary| match r.metric {
                Metric::NsPerOp | Metric::Percent => -r.median,
                Metric::OpsPerSec | Metric::BytesPerSec => r.median,
            };
            key(a).total_cmp(&key(b))
        })
}

/// Writes the chart to `path` (failed rows are left out).
pub fn svg(rows: &[Summary], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let rows: Vec<Summary> = rows.iter().filter(|r| r.ok()).cloned().collect();
    let rows = &rows[..];
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario.as_str()) && r.system == "reactor-uring" {
            scenarios.push(&r.scenario);
        }
    }
    let of = |sc: &str, sys: &str| rows.iter().find(|r| r.scenario == sc && r.system == sys);
    // (scenario index, series index, speed-up)
    let mut bars = Vec::new();
    for (i, sc) in scenarios.iter().enumerate() {
        let uring = of(sc, "reactor-uring").expect("filtered above");
        // (Where both backends run the same code, their ratio is noise: no bar.)
        let others = [
            of(sc, "reactor-epoll").filter(|_| !crate::table::same_path(sc)),
            of(sc, "tokio"),
            best_other(rows, sc),
        ];
        for (k, other) in others.into_iter().enumerate() {
            if let Some(o) = other {
                bars.push((i, k, speedup(uring, o)));
            }
        }
    }
    // Room on the right for the legend.
    let hi = bars.iter().map(|b| b.2).fold(2.0f64, f64::max) * 4.0;
    let lo = bars.iter().map(|b| b.2).fold(0.5f64, f64::min) * 0.8;
    let height = 160 + 28 * scenarios.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "reactor-uring speed-up (>1: reactor-uring faster)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(220)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..scenarios.len() as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(scenarios.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (*y - 0.5).round();
            if (y - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < scenarios.len() {
                scenarios[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .x_desc("speed-up of reactor-uring over the other system (log scale; 1 = equal)")
        .draw()?;
    let colors = [
        RGBColor(70, 110, 200),
        RGBColor(230, 140, 40),
        RGBColor(90, 170, 90),
    ];
    let names = ["vs reactor-epoll", "vs tokio", "vs best peer/floor"];
    for (k, name) in names.iter().enumerate() {
        let color = colors[k];
        chart
            .draw_series(bars.iter().filter(|b| b.1 == k).map(|&(i, k, v)| {
                let y0 = i as f64 + 0.1 + 0.27 * k as f64;
                Rectangle::new([(lo, y0), (v, y0 + 0.25)], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.draw_series(LineSeries::new(
        vec![(1.0, 0.0), (1.0, scenarios.len() as f64)],
        BLACK.stroke_width(1),
    ))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
