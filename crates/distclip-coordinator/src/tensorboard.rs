//! TensorBoard event files (`log.report_to = ["tensorboard"]`, OpenCLIP's
//! `--report-to tensorboard`): the coordinator turns each `metrics.jsonl` line into scalars
//! under `RUN/tensorboard/events.out.tfevents.<time>.<host>`.
//!
//! The format is TensorFlow's: TFRecord framing (length, masked CRC32C of the length, the
//! bytes, masked CRC32C of the bytes) around `tensorflow.Event` messages, a `file_version`
//! event first, then one event per scalar as `SummaryWriter.add_scalar` writes it. The test
//! compares these bytes with a file TensorBoard's own `RecordWriter` wrote
//! (`tools/parity/make_tensorboard_fixture.py`), and [`read_scalars`] parses files back.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::Value;

/// `tensorflow.Event` (`tensorboard/compat/proto/event.proto`), the fields distclip writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event holds.
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The header event's version string (`brain.Event:2`).
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Scalars.
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with its `simple_value` member of the `value` oneof (so a zero
/// is written, not left out as a proto3 default).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// Tag, e.g. `train/loss`.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's CRC: CRC32C, rotated right by 15 and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The header event every event file starts with.
pub fn header(wall_time: f64) -> Event {
    Event {
        wall_time,
        step: 0,
        what: Some(What::FileVersion("brain.Event:2".into())),
    }
}

/// One scalar event.
pub fn scalar(wall_time: f64, step: u64, tag: &str, value: f32) -> Event {
    Event {
        wall_time,
        step: step as i64,
        what: Some(What::Summary(Summary {
            value: vec![SummaryValue {
                tag: tag.into(),
                simple_value: Some(value),
            }],
        })),
    }
}

/// The scalars of one `metrics.jsonl` line, tagged as OpenCLIP tags them: a step line's
/// numeric fields as `train/<field>`, an evaluation line's as `val/<metric>` (nested objects
/// joined with `/`). `step`, `epoch` and `time` are not scalars.
pub fn scalars_of(line: &Value) -> Vec<(String, f32)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, f32)>) {
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    out.push((prefix.to_string(), x as f32));
                }
            }
            Value::Object(o) => {
                for (k, v) in o {
                    walk(&format!("{prefix}/{k}"), v, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let Value::Object(o) = line else { return out };
    if let Some(eval) = o.get("eval") {
        walk("val", eval, &mut out);
        return out;
    }
    for (k, v) in o {
        if !matches!(k.as_str(), "step" | "epoch" | "time") && v.is_number() {
            walk(&format!("train/{k}"), v, &mut out);
        }
    }
    out
}

/// An open event file, appended to as steps commit.
#[derive(Debug)]
pub struct EventFile {
    path: PathBuf,
    file: std::fs::File,
}

impl EventFile {
    /// Create `dir/events.out.tfevents.<secs>.<host>` with its header event.
    pub fn create(dir: &Path, wall_time: f64) -> std::io::Result<EventFile> {
        std::fs::create_dir_all(dir)?;
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}", wall_time as u64));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let mut f = EventFile { path, file };
        f.write(&[header(wall_time)])?;
        Ok(f)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append events in one write, so a reader never sees half a record of a batch.
    pub fn write(&mut self, events: &[Event]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for e in events {
            buf.extend(record(&e.encode_to_vec()));
        }
        self.file.write_all(&buf)
    }

    /// Append the scalars of `metrics.jsonl` lines.
    pub fn write_metrics<'a>(&mut self, lines: impl IntoIterator<Item = &'a Value>, wall_time: f64) -> std::io::Result<()> {
        let mut events = Vec::new();
        for line in lines {
            let Some(step) = line.get("step").and_then(Value::as_u64) else { continue };
            for (tag, v) in scalars_of(line) {
                events.push(scalar(wall_time, step, &tag, v));
            }
        }
        self.write(&events)
    }
}

/// Parse an event file: every event, in order. A bad length or CRC is an error naming the
/// offset; a record cut short at the end (a writer still writing) ends the list.
pub fn read_events(bytes: &[u8]) -> Result<Vec<Event>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes([bytes[at + 8], bytes[at + 9], bytes[at + 10], bytes[at + 11]]);
        if masked_crc(len_bytes) != crc {
            return Err(format!("record at byte {at}: length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or([0; 8])) as usize;
        let start = at + 12;
        let Some(end) = start.checked_add(len).filter(|&e| e + 4 <= bytes.len()) else { break };
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
        if masked_crc(data) != crc {
            return Err(format!("record at byte {at}: data CRC mismatch"));
        }
        out.push(Event::decode(data).map_err(|e| format!("record at byte {at}: {e}"))?);
        at = end + 4;
    }
    Ok(out)
}

/// `(tag, step, value)` of every scalar in `bytes`.
pub fn read_scalars(bytes: &[u8]) -> Result<Vec<(String, u64, f32)>, String> {
    let mut out = Vec::new();
    for e in read_events(bytes)? {
        if let Some(What::Summary(s)) = e.what {
            for v in s.value {
                if let Some(x) = v.simple_value {
                    out.push((v.tag, e.step as u64, x));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tensorboard").join(name)
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn bytes_equal_tensorboards_own_writer() {
        let want = std::fs::read(fixture("events.out.tfevents.fixture")).unwrap();
        let list: Vec<(f64, u64, Option<String>, Option<f64>)> =
            serde_json::from_str(&std::fs::read_to_string(fixture("events.json")).unwrap()).unwrap();
        let mut got = Vec::new();
        for (wall, step, tag, value) in &list {
            let e = match (tag, value) {
                (Some(t), Some(v)) => scalar(*wall, *step, t, *v as f32),
                _ => header(*wall),
            };
            got.extend(record(&e.encode_to_vec()));
        }
        assert_eq!(got, want);
        let scalars = read_scalars(&want).unwrap();
        assert_eq!(scalars.len(), list.len() - 1);
        assert_eq!(scalars[0], ("train/loss".to_string(), 0, 0.0));
        assert_eq!(scalars[4], ("train/samples_per_second".to_string(), 123_456_789_012, -17.125));
    }

    #[test]
    fn metrics_lines_become_train_and_val_scalars() {
        let step: Value = serde_json::json!({"step": 3, "epoch": 0, "time": 5.0, "loss": 2.5, "lr": 0.001, "workers": [1]});
        let eval: Value = serde_json::json!({"step": 3, "epoch": 0, "eval": {"zeroshot": {"top1": 0.25}, "retrieval": {"image_to_text_R@1": 0.5}}});
        let sorted = |mut v: Vec<(String, f32)>| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(sorted(scalars_of(&step)), vec![("train/loss".into(), 2.5), ("train/lr".into(), 0.001)]);
        assert_eq!(
            sorted(scalars_of(&eval)),
            vec![("val/retrieval/image_to_text_R@1".into(), 0.5), ("val/zeroshot/top1".into(), 0.25)]
        );
    }

    #[test]
    fn a_written_file_reads_back_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("distclip-tb-{}", std::process::id()));
        let mut f = EventFile::create(&dir, 1.5).unwrap();
        f.write_metrics(&[serde_json::json!({"step": 0, "loss": 4.0}), serde_json::json!({"step": 1, "loss": 3.0})], 2.0)
            .unwrap();
        let mut bytes = std::fs::read(f.path()).unwrap();
        let events = read_events(&bytes).unwrap();
        assert_eq!(events[0], header(1.5));
        assert_eq!(read_scalars(&bytes).unwrap(), vec![("train/loss".into(), 0, 4.0), ("train/loss".into(), 1, 3.0)]);
        // A record cut short (a writer mid-write) ends the list; a flipped byte is an error.
        assert_eq!(read_events(&bytes[..bytes.len() - 3]).unwrap().len(), 2);
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        assert!(read_events(&bytes).unwrap_err().contains("CRC"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
