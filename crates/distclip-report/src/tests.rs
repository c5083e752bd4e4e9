//! Reports of synthetic run directories: plots decoded and inspected, summary numbers checked
//! against values worked out by hand, and every kind of bad input.

use std::collections::HashSet;
use std::path::Path;

use serde_json::json;

use crate::plot::{HEIGHT, LineChart, PALETTE, Series, WIDTH, segments, tick, y_range};
use crate::summary::num;
use crate::{ReportError, load_run, write_report};

/// Loss of step `s` in the synthetic run (step 10's is non-finite, written as null).
fn loss(s: u64) -> Option<f64> {
    (s != 10).then_some(2.0 - 0.025 * s as f64)
}

/// A step line as the coordinator writes it. Worker `w-b` is out of the quorum for steps
/// 12..=14 (it died and rejoined); `w-a` alternates 0.4 s and 0.6 s steps, `w-b` takes 0.8 s.
fn step_line(s: u64, loss: Option<f64>) -> serde_json::Value {
    let a_step = if s.is_multiple_of(2) { 0.4 } else { 0.6 };
    let b_in = !(12..=14).contains(&s);
    let mut workers = serde_json::Map::new();
    workers.insert(
        "w-a".into(),
        json!({"rank": 0, "samples": 32, "samples_per_s": 32.0 / a_step, "data_s": 0.1, "compute_s": 0.3, "comm_s": 0.1, "step_s": a_step}),
    );
    if b_in {
        workers.insert(
            "w-b".into(),
            json!({"rank": 1, "samples": 32, "samples_per_s": 40.0, "data_s": 0.2, "compute_s": 0.4, "comm_s": 0.2, "step_s": 0.8}),
        );
    }
    let samples = if b_in { 64 } else { 32 };
    let step_s: f64 = if b_in { 0.8 } else { a_step };
    json!({
        "step": s, "epoch": s / 16, "quorum_id": 1 + u64::from(s >= 15), "world_size": workers.len(),
        "loss": loss, "lr": 5e-4 * ((s + 1) as f64 / 10.0).min(1.0), "logit_scale": 14.2857 + 0.01 * s as f64,
        "grad_norm": 1.5, "samples": samples, "samples_seen": 64 * (s + 1) - if s >= 12 { 32 * (s.min(14) - 11) } else { 0 },
        "samples_per_s": samples as f64 / step_s, "step_s": step_s, "data_s": 0.2, "compute_s": 0.4, "comm_s": 0.2,
        "params_checksum": "abc", "workers": workers, "time": 1000.0 + s as f64,
    })
}

fn eval_line(step: u64, top1: f64, top5: f64, i2t: f64, t2i: f64) -> serde_json::Value {
    json!({"step": step, "epoch": step / 16, "eval": {
        "zeroshot": {"shapes": {"top1": top1, "top5": top5, "chance": 0.125, "samples": 200}},
        "retrieval": {"samples": 200, "image_to_text_r1": i2t, "text_to_image_r1": t2i},
    }})
}

/// A 40-step, 2-worker run that was resumed: steps 20..=24 were first written with a bogus
/// loss (9.x), then rewritten after the resume; two evaluations; events; config; state.
fn write_run(dir: &Path) {
    let mut lines = Vec::new();
    for s in 0..=24 {
        let l = if s >= 20 { Some(9.5 + 0.01 * s as f64) } else { loss(s) };
        lines.push(step_line(s, l));
        if s == 19 {
            lines.push(eval_line(19, 0.25, 0.75, 0.1, 0.12));
        }
    }
    for s in 20..40 {
        lines.push(step_line(s, loss(s)));
    }
    lines.push(eval_line(39, 0.5625, 0.9375, 0.3, 0.35));
    write_lines(&dir.join("metrics.jsonl"), &lines);
    let events = [
        json!({"time": 999.0, "kind": "join", "worker": "w-a", "step": 0}),
        json!({"time": 999.5, "kind": "join", "worker": "w-b", "step": 0}),
        json!({"time": 999.6, "kind": "quorum", "members": ["w-a", "w-b"], "step": 0}),
        json!({"time": 1012.0, "kind": "death", "worker": "w-b", "reason": "heartbeat timeout", "step": 12}),
        json!({"time": 1015.0, "kind": "join", "worker": "w-b", "step": 15}),
        json!({"time": 1015.1, "kind": "quorum", "members": ["w-a", "w-b"], "step": 15}),
        json!({"time": 1020.0, "kind": "checkpoint", "path": "checkpoints/step-20", "step": 20}),
        json!({"time": 1030.0, "kind": "resume", "samples_seen": 1184, "step": 20}),
        json!({"time": 1040.0, "kind": "finish", "reason": "epochs done", "step": 40}),
    ];
    write_lines(&dir.join("events.jsonl"), &events);
    std::fs::write(
        dir.join("config.toml"),
        "[model]\nname = \"tiny\"\n\n[train]\nbatch_size = 32\nepochs = 3\nlr = 0.0005\nwarmup = 10\n",
    )
    .unwrap();
    std::fs::write(dir.join("state.json"), r#"{"version": 1, "run_id": "run-test-1", "step": 40}"#).unwrap();
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn rgb(c: plotters::style::RGBColor) -> [u8; 3] {
    [c.0, c.1, c.2]
}

/// Decode a PNG and check it is a drawn plot: the right size, mostly white, with the
/// anti-aliased greys of rendered text (many distinct colours) and each of `colors` present.
fn check_png(path: &Path, colors: &[[u8; 3]]) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    assert_eq!(img.dimensions(), (WIDTH, HEIGHT), "{}", path.display());
    let distinct: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(distinct.len() >= 30, "{}: only {} colours", path.display(), distinct.len());
    let white = img.pixels().filter(|p| p.0 == [255, 255, 255]).count();
    let total = (WIDTH * HEIGHT) as usize;
    assert!(white > total / 2 && white < total * 99 / 100, "{}: {white} of {total} pixels white", path.display());
    for c in colors {
        let n = img.pixels().filter(|p| p.0 == *c).count();
        assert!(n >= 100, "{}: {n} pixels of line colour {c:?}", path.display());
    }
}

#[test]
fn report_of_a_resumed_two_worker_run() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path());
    let report = write_report(dir.path(), None).unwrap();
    let out = dir.path().join("report");
    assert_eq!(report.markdown, out.join("report.md"));
    assert_eq!(report.steps, 40);
    let names: Vec<String> =
        report.plots.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["loss.png", "lr.png", "logit_scale.png", "throughput.png", "step_time.png", "eval.png"]);
    for p in &report.plots {
        assert_eq!(p.parent().unwrap(), out);
    }
    let blue = rgb(PALETTE[0]);
    for p in &report.plots[..4] {
        check_png(p, &[blue]);
    }
    // One line per worker, in its own colour.
    check_png(&report.plots[4], &[blue, rgb(PALETTE[1])]);
    check_png(&report.plots[5], &[blue]);

    let md = std::fs::read_to_string(&report.markdown).unwrap();
    for want in [
        "# Training report: run-test-1",
        "| run id | `run-test-1` |",
        "| model | `tiny` |",
        "| batch size per worker | 32 |",
        "| learning rate (peak) | 5.000e-4 |",
        "| epochs (configured) | 3 |",
        "| steps committed | 40 (steps 0 to 39) |",
        "| epochs reached | 0 to 2 |",
        "| samples seen | 2464 |",
        "| workers | 2 seen, world size 2 at the last step |",
        "| wall time | 39 s from the first to the last step line |",
        "5 step lines were superseded",
        // Step 10's loss is null; the first resume's 9.x losses are gone.
        "| loss | 2 (step 0) | 1.025 (step 39) | 1.025 (step 39) | 2 (step 0) |",
        "| learning rate | 5.000e-5 (step 0) | 5.000e-4 (step 39) | 5.000e-5 (step 0) | 5.000e-4 (step 9) |",
        "| logit scale | 14.2857 (step 0) | 14.6757 (step 39) |",
        // 37 steps at 0.8 s and 64 samples, 3 at w-a's pace with 32.
        "| samples/s (samples over summed step seconds) | 79.4839 |",
        "| `w-a` | 0 | 40 | 0.5 | 0.1 | 0.3 | 0.1 | 66.6667 |",
        "| `w-b` | 1 | 37 | 0.8 | 0.2 | 0.4 | 0.2 | 40 |",
        "2 evaluations; the last after step 39 (epoch 2):",
        "| `shapes` | 0.5625 | 0.9375 | 0.125 | 200 |",
        "| `image_to_text_r1` | 0.3 |",
        "9 events.",
        "| join | 3 |",
        "| quorum | 2 |",
        "| death | 1 |",
        "- +13 s, step 12: **death**: `",
        "reason: heartbeat timeout",
        "- +21 s, step 20: **checkpoint**: `path: checkpoints/step-20`",
        "- +31 s, step 20: **resume**: `samples_seen: 1184`",
        "**finish**",
        "![loss](loss.png)",
        "![learning rate](lr.png)",
        "![logit scale](logit_scale.png)",
        "![throughput](throughput.png)",
        "![step time per worker](step_time.png)",
        "![evaluation](eval.png)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    assert!(!md.contains("9.7"), "a superseded loss leaked into the summary:\n{md}");
    assert!(!md.contains("**join**"), "joins are counted, not listed:\n{md}");
}

#[test]
fn the_loaded_run_merges_duplicates_and_keeps_nulls_as_gaps() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path());
    let run = load_run(dir.path()).unwrap();
    assert_eq!(run.steps.len(), 40);
    assert_eq!(run.superseded, 5);
    assert!(run.steps.iter().enumerate().all(|(i, s)| s.step == i as u64));
    assert_eq!(run.steps[20].loss, loss(20));
    assert_eq!(run.steps[10].loss, None);
    assert_eq!(run.steps[13].workers.keys().collect::<Vec<_>>(), ["w-a"]);
    assert_eq!(run.steps[13].world_size, Some(1));
    assert_eq!(run.evals.iter().map(|e| e.step).collect::<Vec<_>>(), [19, 39]);
    assert_eq!(run.evals[0].zeroshot["shapes"].top1, Some(0.25));
    assert_eq!(run.evals[1].retrieval["text_to_image_r1"], 0.35);
    let events = run.events.unwrap();
    assert_eq!(events.len(), 9);
    assert_eq!(events[3].kind, "death");
    assert_eq!(events[3].step, Some(12));
    assert_eq!(events[3].line, 4);
    assert_eq!(events[3].fields["worker"], "w-b");
    let cfg = run.config.unwrap();
    assert_eq!((cfg.model.as_deref(), cfg.batch_size, cfg.lr, cfg.epochs), (Some("tiny"), Some(32), Some(5e-4), Some(3)));
    assert_eq!(run.run_id.as_deref(), Some("run-test-1"));
}

#[test]
fn out_folder_option_and_a_run_without_optional_files() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<_> = (0..3).map(|s| step_line(s, None)).collect();
    write_lines(&dir.path().join("metrics.jsonl"), &lines);
    let out = dir.path().join("elsewhere/nested");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("eval.png"), b"stale").unwrap();
    let report = write_report(dir.path(), Some(&out)).unwrap();
    assert_eq!(report.markdown, out.join("report.md"));
    assert_eq!(report.steps, 3);
    assert_eq!(report.plots.len(), 5);
    assert!(!out.join("eval.png").exists(), "an earlier report's eval.png must not survive");
    assert!(!dir.path().join("report").exists());
    // Every loss is null: the plot is still drawn (frame, labels, a note), without the line.
    let img = image::open(&report.plots[0]).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
    assert!(!img.pixels().any(|p| p.0 == rgb(PALETTE[0])));
    let md = std::fs::read_to_string(&report.markdown).unwrap();
    for want in [
        "# Training report\n",
        "| run id | unknown (no state.json) |",
        "| model | n/a (no config.toml) |",
        "| loss | no finite value |",
        "No `events.jsonl` in the run directory.",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    assert!(!md.contains("## Evaluation"));
}

#[test]
fn plot_text_is_drawn_with_the_embedded_font() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.png");
    let chart = LineChart {
        title: "Training loss".into(),
        y_desc: "loss".into(),
        series: vec![Series {
            label: String::new(),
            points: vec![(0, Some(1.0)), (1, Some(2.0))],
            color: PALETTE[0],
            markers: false,
            dashed: false,
        }],
        y_range: None,
    };
    crate::plot::write_png(&chart, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    // The caption sits in the top band, centred: dark glyph pixels there and in shades of grey
    // (anti-aliasing), none at the band's left end.
    let band: Vec<[u8; 3]> = (0..44).flat_map(|y| (0..WIDTH).map(move |x| (x, y))).map(|(x, y)| img.get_pixel(x, y).0).collect();
    let dark = band.iter().filter(|p| p.iter().all(|&c| c < 80)).count();
    let greys: HashSet<&[u8; 3]> = band.iter().filter(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 30 && p[0] < 225).collect();
    assert!(dark > 100, "{dark} dark pixels in the caption band");
    assert!(greys.len() > 10, "{} grey levels in the caption band", greys.len());
    assert!((0..40).all(|y| img.get_pixel(5, y).0 == [255, 255, 255]));
}

fn err_of(dir: &Path) -> String {
    match write_report(dir, None) {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_or_stepless_metrics_file_says_no_steps() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let want = format!("no steps in {}: did the run commit any step?", metrics.display());
    assert_eq!(err_of(dir.path()), want);
    std::fs::write(&metrics, "\n  \n").unwrap();
    assert_eq!(err_of(dir.path()), want);
    write_lines(&metrics, &[eval_line(0, 0.1, 0.2, 0.1, 0.1)]);
    assert_eq!(err_of(dir.path()), want);
    assert!(matches!(load_run(dir.path()), Err(ReportError::NoSteps { .. })));
    let gone = dir.path().join("nope");
    assert_eq!(err_of(&gone), format!("run directory {} does not exist or is not a folder", gone.display()));
}

#[test]
fn a_malformed_metrics_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let good = step_line(0, Some(1.0)).to_string();
    let cases = [
        ("{\"step\": 1, \"loss\": 1.0", "not JSON"),
        ("[1, 2]", "a JSON array, not an object"),
        ("{\"step\": 1, \"loss\": \"high\"}", "`loss` is \"high\", not a number"),
        ("{\"step\": -1, \"loss\": 1.0}", "`step` is -1, not a non-negative integer"),
        ("{\"loss\": 1.0}", "no `step` field"),
        ("{\"step\": 1, \"lr\": 0.1}", "neither a step line (no `loss` field) nor an evaluation line"),
        ("{\"step\": 1, \"loss\": 1.0, \"workers\": {\"w-a\": {\"step_s\": \"x\"}}}", "`workers.w-a.step_s` is \"x\", not a number"),
        ("{\"step\": 1, \"loss\": 1.0, \"workers\": [1]}", "`workers` is a JSON array, not an object"),
        ("{\"step\": 1, \"eval\": {\"zeroshot\": {\"shapes\": {\"top1\": true}}}}", "`eval.zeroshot.shapes.top1` is a JSON boolean, not a number"),
        ("{\"step\": 1, \"eval\": {\"retrieval\": {\"r1\": \"a\"}}}", "`eval.retrieval.r1` is \"a\", not a number"),
    ];
    for (bad, message) in cases {
        // The bad line is line 3, after a good line and a blank one.
        std::fs::write(&metrics, format!("{good}\n\n{bad}\n{good}\n")).unwrap();
        let e = err_of(dir.path());
        assert!(e.starts_with(&format!("{}:3: ", metrics.display())), "{e}");
        assert!(e.contains(message), "{bad}: {e}");
    }
}

#[test]
fn malformed_events_config_or_state_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_lines(&dir.path().join("metrics.jsonl"), &[step_line(0, Some(1.0))]);
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, "{\"time\": 1, \"kind\": \"join\"}\n{\"time\": 2}\n").unwrap();
    assert_eq!(err_of(dir.path()), format!("{}:2: no `kind` field", events.display()));
    std::fs::write(&events, "{\"time\": \"noon\", \"kind\": \"join\"}\n").unwrap();
    assert_eq!(err_of(dir.path()), format!("{}:1: `time` is \"noon\", not a number", events.display()));
    std::fs::remove_file(&events).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[train\nlr = 1").unwrap();
    assert!(err_of(dir.path()).starts_with(&format!("{}: ", config.display())));
    std::fs::write(&config, "[train]\nlr = 1\n").unwrap();
    assert_eq!(load_run(dir.path()).unwrap().config.unwrap().lr, Some(1.0));
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{\"run_id\": ").unwrap();
    assert!(err_of(dir.path()).starts_with(&format!("{}: not JSON", state.display())));
}

#[test]
fn gaps_ranges_and_number_formats() {
    let pts = [(0, Some(1.0)), (1, None), (2, Some(3.0)), (3, Some(f64::NAN)), (4, Some(5.0)), (5, Some(6.0))];
    assert_eq!(segments(&pts), vec![vec![(0, 1.0)], vec![(2, 3.0)], vec![(4, 5.0), (5, 6.0)]]);
    let s = |points: Vec<(i64, Option<f64>)>| Series { label: String::new(), points, color: PALETTE[0], markers: false, dashed: false };
    let (lo, hi) = y_range(&[s(vec![(0, Some(1.0)), (1, Some(3.0)), (2, None)])]);
    assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12, "{lo} {hi}");
    assert_eq!(y_range(&[s(vec![(0, Some(2.0))])]), (1.8, 2.2));
    assert_eq!(y_range(&[s(vec![(0, Some(0.0))])]), (-1.0, 1.0));
    assert_eq!(y_range(&[s(vec![(0, None)])]), (0.0, 1.0));
    assert_eq!([tick(0.0), tick(2.5), tick(0.00025), tick(-1.0), tick(123456.0)], ["0", "2.5", "2.50e-4", "-1", "1.23e5"]);
    assert_eq!([num(1.0250000000000001), num(5e-4), num(66.66666), num(0.0), num(2464.0)], ["1.025", "5.000e-4", "66.6667", "0", "2464"]);
}
