//! The coordinator's status page as a person sees it: a real 2-worker `distclip launch`, the
//! page opened once in headless Chromium (driven over the DevTools protocol), and then, without
//! reloading, it must show both worker rows, a loss curve with points, recent events, and a
//! step counter that advances.
//!
//! Chromium is a system package (`.ci/run` installs Debian's `chromium`). Without one the test
//! says "skipped" on stdout and passes, unless `DISTCLIP_REQUIRE_BROWSER=1` (set by `.ci/run`),
//! which makes a missing browser a failure.

mod common;
use common::{synth, tmp, wait_until};

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The browser to drive: `DISTCLIP_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DISTCLIP_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Ends the process when dropped, so a failed assertion leaves nothing running: SIGINT first
/// (launch then stops its coordinator and workers), SIGKILL after 20 s.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DevTools session on one page target (flattened sessions over the browser's socket).
struct Page {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    session: String,
    next_id: u64,
}

impl Page {
    /// Start `browser` headless, open `url` in a new tab and attach to it.
    fn open(browser: &Path, profile: &Path, url: &str) -> (Guard, Page) {
        let child = Command::new(browser)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1400,900"])
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", browser.display()));
        let guard = Guard(child);
        // Chromium writes the port it chose, then the browser target's path, to this file.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        let ws_url = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let [port, path, ..] = text.lines().collect::<Vec<_>>()[..]
            {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            assert!(Instant::now() < deadline, "Chromium wrote no DevToolsActivePort within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        };
        let (socket, _) = tungstenite::connect(ws_url.as_str()).expect("connecting to Chromium's DevTools socket");
        let mut page = Page { socket, session: String::new(), next_id: 0 };
        let target = page.call("Target.createTarget", json!({"url": url}), None);
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = page.call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}), None);
        page.session = attached["sessionId"].as_str().unwrap().to_owned();
        (guard, page)
    }

    /// Send one command and wait for its answer (events in between are ignored).
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let mut msg = json!({"id": self.next_id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.socket.send(tungstenite::Message::Text(msg.to_string().into())).unwrap();
        loop {
            let reply = self.socket.read().unwrap();
            let Ok(text) = reply.into_text() else { continue };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"] == self.next_id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page; its value (JSON-serialisable).
    fn eval(&mut self, expr: &str) -> Value {
        let session = self.session.clone();
        let r = self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true}), Some(&session));
        r["result"]["value"].clone()
    }
}

/// What a person sees, read from the page.
const PROBE: &str = r#"JSON.stringify({
  rows: document.querySelectorAll('#workers tbody tr.worker-row').length,
  step: Number(document.getElementById('step').textContent),
  points: Number(document.getElementById('curve-loss').dataset.points),
  polyline: (document.querySelector('#curve-loss polyline') || {getAttribute: () => ''}).getAttribute('points') || '',
  events: document.querySelectorAll('#events li').length,
  updates: Number(document.body.dataset.updates),
  navigations: performance.getEntriesByType('navigation').length,
  state: document.getElementById('state').textContent,
  devices: Array.from(document.querySelectorAll('#workers tbody tr.worker-row td:nth-child(4)')).map(td => td.textContent)
})"#;

#[test]
fn status_page_shows_a_live_run() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("DISTCLIP_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "no Chromium found (DISTCLIP_CHROMIUM or chromium on PATH) and DISTCLIP_REQUIRE_BROWSER=1: install Debian's `chromium`"
        );
        println!("skipped: no Chromium on PATH (install `chromium`, or set DISTCLIP_CHROMIUM; .ci/run requires it)");
        return;
    };
    let dir = tmp("status-page");
    let spec = synth(&dir, 480, 40);
    let run = dir.join("run");
    let log = dir.join("launch.log");
    let launch = Command::new(env!("CARGO_BIN_EXE_distclip"))
        .args(["launch", "--workers", "2", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--model", "tiny"])
        .args(["--threads", "1", "--batch-size", "8", "--epochs", "50", "--seed", "4"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let launch = Guard(launch);
    let http_file = run.join("coordinator.http");
    let steps = || std::fs::read_to_string(run.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
    wait_until("2 committed steps", Duration::from_secs(300), &log, || http_file.exists() && steps() >= 2);
    let deadline = Instant::now() + Duration::from_secs(300);
    let url = format!("http://{}/", std::fs::read_to_string(&http_file).unwrap().trim());

    let (_browser, mut page) = Page::open(&browser, &dir.join("profile"), &url);
    let mut first: Option<Value> = None;
    let seen = loop {
        let v: Value = serde_json::from_str(page.eval(PROBE).as_str().unwrap_or("{}")).unwrap_or_default();
        if v["updates"].as_u64().unwrap_or(0) >= 1 {
            let start = first.get_or_insert_with(|| v.clone());
            if v["step"].as_u64() >= start["step"].as_u64().map(|s| s + 3) {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the page never showed the step advance; last seen {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let first = first.unwrap();
    println!("status page: first {first}\nthen {seen}");
    assert_eq!(seen["navigations"], 1, "the page advanced without a reload");
    assert!(seen["updates"].as_u64() > first["updates"].as_u64(), "{first} -> {seen}");
    assert_eq!(seen["rows"], 2, "one row per worker: {seen}");
    assert_eq!(seen["devices"], json!(["flex", "flex"]), "{seen}");
    assert_eq!(seen["state"], "training", "{seen}");
    assert!(seen["events"].as_u64() >= Some(3), "two joins and a quorum at least: {seen}");
    let points = seen["points"].as_u64().unwrap();
    assert!(points >= 3, "a loss curve with points: {seen}");
    // The curve is drawn: one x,y pair per point.
    let drawn = seen["polyline"].as_str().unwrap().split_whitespace().filter(|p| p.split(',').count() == 2).count();
    assert_eq!(drawn as u64, points, "{seen}");
    drop(launch);
    std::fs::remove_dir_all(&dir).ok();
}
