//! Exact parity with `open_clip.tokenize` (OpenCLIP 3.3.0) on the checked-in fixture made by
//! `tools/parity/tokenizer/make_token_fixtures.py`.

use distclip_tokenizer::{DEFAULT_CONTEXT_LENGTH, EOT, SOT, Tokenizer};
use serde_json::Value;
use std::path::Path;

struct Case {
    text: String,
    /// (context length, expected row with padding restored)
    rows: Vec<(usize, Vec<u32>)>,
}

fn load(path: &Path) -> (Value, Vec<Case>) {
    let raw =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&raw).expect("fixture is JSON");
    let cases = v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let text = c["text"].as_str().expect("text").to_owned();
            let mut rows: Vec<(usize, Vec<u32>)> = c["tokens"]
                .as_object()
                .expect("tokens")
                .iter()
                .map(|(n, ids)| {
                    let n: usize = n.parse().expect("context length key");
                    let mut row: Vec<u32> = ids
                        .as_array()
                        .expect("ids")
                        .iter()
                        .map(|x| x.as_u64().expect("id") as u32)
                        .collect();
                    row.resize(n, 0);
                    (n, row)
                })
                .collect();
            rows.sort_by_key(|r| r.0);
            Case { text, rows }
        })
        .collect();
    (v, cases)
}

/// Check every case; report the first mismatches with enough to debug them.
fn check(cases: &[Case]) -> usize {
    let tok = Tokenizer::shared();
    let mut failures = 0;
    for case in cases {
        for (n, expected) in &case.rows {
            let got = tok.tokenize(&case.text, *n);
            if &got != expected {
                failures += 1;
                if failures <= 20 {
                    eprintln!(
                        "MISMATCH (context {n})\n  text:     {:?}\n  cleaned:  {:?}\n  expected: {:?}\n  got:      {:?}",
                        case.text,
                        tok.clean(&case.text),
                        trim(expected),
                        trim(&got)
                    );
                }
            }
        }
    }
    failures
}

fn trim(v: &[u32]) -> &[u32] {
    let end = v.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    &v[..end]
}

#[test]
fn open_clip_fixture_parity() {
    let path = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("tests/fixtures/open_clip_tokens.json");
    let (header, cases) = load(&path);
    assert_eq!(header["open_clip_version"], "3.3.0");
    assert!(cases.len() > 1000, "fixture has {} cases", cases.len());
    let rows: usize = cases.iter().map(|c| c.rows.len()).sum();
    let failures = check(&cases);
    assert_eq!(
        failures, 0,
        "{failures} of {rows} rows differ from open_clip.tokenize"
    );
}

#[test]
fn batch_matches_single() {
    let tok = Tokenizer::shared();
    let texts = ["a photo of a cat", "", "&amp; caf\u{e9}"];
    let batch = tok.tokenize_batch(&texts, DEFAULT_CONTEXT_LENGTH);
    for (t, row) in texts.iter().zip(&batch) {
        assert_eq!(row, &tok.tokenize(t, DEFAULT_CONTEXT_LENGTH));
        assert_eq!(row[0], SOT);
        assert!(row.contains(&EOT));
    }
}

#[test]
fn round_trip_lowercase_ascii() {
    let tok = Tokenizer::shared();
    for s in [
        "a photo of a dog",
        "two cats sleeping on a red sofa",
        "the eiffel tower at night, paris 2019!",
        "don't stop me now",
    ] {
        let decoded = tok.decode(&tok.encode(s));
        // Decoding puts a space after every word end, including before punctuation.
        let squash = |x: &str| x.split_whitespace().collect::<String>();
        assert_eq!(squash(&decoded), squash(s), "{s:?} -> {decoded:?}");
    }
    assert_eq!(tok.decode(&tok.encode("hello world")), "hello world ");
}

/// Never panics, whatever the input.
#[test]
fn arbitrary_input_does_not_panic() {
    let tok = Tokenizer::shared();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        let len = (next() % 40) as usize;
        let s: String = (0..len)
            .filter_map(|_| {
                let r = next();
                let cp = match r % 4 {
                    0 => (r >> 8) % 0x80,
                    1 => (r >> 8) % 0x300,
                    2 => (r >> 8) % 0x3_0000,
                    _ => (r >> 8) % 0x11_0000,
                };
                char::from_u32(cp as u32)
            })
            .collect();
        for n in [1, 2, 77] {
            let row = tok.tokenize(&s, n);
            assert_eq!(row.len(), n);
        }
        let _ = tok.decode(&tok.encode(&s));
    }
    let _ = tok.decode(&[u32::MAX, 0, 49407, 60000]);
}

/// Large differential run against a file made with
/// `make_token_fixtures.py --fuzz N --out PATH`; set DISTCLIP_TOKENIZER_FUZZ=PATH.
#[test]
#[ignore = "needs DISTCLIP_TOKENIZER_FUZZ (a generated fixture that is not checked in)"]
fn fuzz_parity() {
    let path = std::env::var("DISTCLIP_TOKENIZER_FUZZ").expect("DISTCLIP_TOKENIZER_FUZZ=path");
    let (_, cases) = load(Path::new(&path));
    let rows: usize = cases.iter().map(|c| c.rows.len()).sum();
    let failures = check(&cases);
    assert_eq!(
        failures, 0,
        "{failures} of {rows} rows differ from open_clip.tokenize"
    );
}

/// One shared tokenizer used from several threads gives the same rows as one thread.
#[test]
fn shared_across_threads() {
    let path = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("tests/fixtures/open_clip_tokens.json");
    let (_, cases) = load(&path);
    let cases = &cases;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|k| {
                s.spawn(move || {
                    cases
                        .iter()
                        .skip(k)
                        .step_by(2)
                        .filter(|c| {
                            let (n, expected) = &c.rows[0];
                            &Tokenizer::shared().tokenize(&c.text, *n) != expected
                        })
                        .count()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().expect("thread"), 0);
        }
    });
}
