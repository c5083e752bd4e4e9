//! Who may take part in a run, end to end through the binary: `distclip certs` makes a CA and a
//! node certificate; a coordinator with mutual TLS and a run token turns away a worker with the
//! wrong token, one whose certificate comes from another CA and one with no certificate, each
//! with an error that names the problem; then a worker with the run's certificate and token
//! trains the run to the end. Neither token reaches the events or the coordinator's log.

mod common;
use common::{finished_json, jsonl, ok_json, synth, tmp, wait_until};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_distclip");
const TOKEN: &str = "run-token-5e1f0c";
const WRONG: &str = "run-token-guess9";

/// `--tls-*` flags for the files `distclip certs` reported.
fn tls_flags(certs: &serde_json::Value, mutual: bool) -> Vec<String> {
    let mut f: Vec<String> = ["ca", "cert", "key"]
        .iter()
        .flat_map(|k| [format!("--tls-{k}"), certs[*k].as_str().unwrap().to_owned()])
        .collect();
    if mutual {
        f.push("--tls-mutual".into());
    }
    f
}

/// Run a worker that must be turned away: it exits non-zero within 60 s; returns its stderr.
fn refused(addr: &str, token: &str, tls: &[String], log: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["worker", "--coordinator", addr, "--threads", "1"])
        .args(tls)
        .env("DISTCLIP_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    // Not `wait_until`: a worker that was let in must be killed, not left training.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a refused worker kept running; its log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(log).unwrap();
    assert!(!status.success(), "a stranger was admitted; its log:\n{text}");
    text
}

#[test]
fn mutual_tls_run_trains_and_turns_strangers_away() {
    let dir = tmp("security");
    let spec = synth(&dir, 48, 16);
    let run = dir.join("run");
    let pki = ok_json(&["certs", "--out", dir.join("pki").to_str().unwrap(), "--hosts", "127.0.0.1"]);
    let other = ok_json(&["certs", "--out", dir.join("other").to_str().unwrap(), "--hosts", "127.0.0.1"]);
    let ours = tls_flags(&pki, true);

    let coordinator_log = dir.join("coordinator.log");
    let coordinator = Command::new(BIN)
        .args(["coordinator", "--data", &spec, "--run-dir", run.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--http-listen", "off", "--min-workers", "1", "--model", "tiny", "--batch-size", "16"])
        .args(["--epochs", "1", "--seed", "1"])
        .args(&ours)
        .env("DISTCLIP_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&coordinator_log).unwrap())
        .spawn()
        .unwrap();
    let addr_file = run.join("coordinator.addr");
    wait_until("coordinator.addr", Duration::from_secs(60), &coordinator_log, || addr_file.exists());
    let addr = std::fs::read_to_string(&addr_file).unwrap().trim().to_owned();

    let wrong_token = refused(&addr, WRONG, &ours, &dir.join("w-token.log"));
    assert!(wrong_token.contains("missing or wrong run token"), "{wrong_token}");
    let wrong_ca = refused(&addr, TOKEN, &tls_flags(&other, true), &dir.join("w-ca.log"));
    assert!(wrong_ca.contains("TLS handshake failed") && wrong_ca.contains("certificate"), "{wrong_ca}");
    let no_cert = refused(&addr, TOKEN, &tls_flags(&pki, false), &dir.join("w-nocert.log"));
    // TLS 1.3 sends the server's verdict on the client's certificate after the client's side
    // of the handshake ends, so the worker learns of it at its first call, as an alert or as a
    // closed connection depending on timing.
    assert!(no_cert.contains("join:"), "refused at the first call: {no_cert}");
    // Plaintext against TLS: refused at once, not after the reconnect window.
    let plaintext = refused(&addr, TOKEN, &[], &dir.join("w-plain.log"));
    assert!(plaintext.contains("join:"), "{plaintext}");
    // A plaintext URL under TLS is a mistake the worker reports before dialling.
    let plain_url = refused(&format!("http://{addr}"), TOKEN, &ours, &dir.join("w-http.log"));
    assert!(plain_url.contains("must start with https://"), "{plain_url}");

    let worker_log = dir.join("worker.log");
    let worker = Command::new(BIN)
        .args(["worker", "--coordinator", &addr, "--threads", "1"])
        .args(&ours)
        .env("DISTCLIP_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&worker_log).unwrap())
        .spawn()
        .unwrap();
    let w = finished_json(worker, "the worker", &worker_log);
    assert_eq!(w["steps"], 3, "48 samples at batch 16: {w}");
    let outcome = finished_json(coordinator, "the coordinator", &coordinator_log);
    assert_eq!(outcome["state"], "finished", "{outcome}");

    let events = jsonl(&run.join("events.jsonl"));
    let refusals: Vec<_> = events.iter().filter(|e| e["kind"] == "auth_refused").collect();
    assert!(refusals.iter().any(|e| e["reason"] == "wrong token"), "{events:?}");
    // TLS refusals never reach the service, so only the wrong token is an event.
    assert_eq!(events.iter().filter(|e| e["kind"] == "join").count(), 1, "{events:?}");
    let log = std::fs::read_to_string(&coordinator_log).unwrap();
    let recorded = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    for secret in [TOKEN, WRONG] {
        assert!(!log.contains(secret) && !recorded.contains(secret), "a token leaked into the coordinator's records");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
