//! Helpers shared by the end-to-end tests of the `distclip` binary.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::process::{Command, Output};

use serde_json::Value;

/// Run the binary under test.
pub fn distclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distclip")).args(args).output().expect("run distclip")
}

/// Run it, require success, and parse the last stdout line as JSON.
pub fn ok_json(args: &[&str]) -> Value {
    let out = distclip(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "distclip {args:?} failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("no JSON line on stdout; stderr:\n{stderr}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"))
}

/// Run it, require failure, and return stderr.
pub fn err_text(args: &[&str]) -> String {
    let out = distclip(args);
    assert!(!out.status.success(), "distclip {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}
