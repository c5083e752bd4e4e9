//! Zero-shot classification, as `open_clip/zero_shot_classifier.py::build_zero_shot_classifier`
//! and `open_clip_train/zero_shot.py::run` do it.

use std::path::Path;

use burn::tensor::Device;
use distclip_model::Clip;
use serde::{Deserialize, Serialize};

use crate::embed::{EvalOptions, encode_images, encode_texts, read_pairs};
use crate::EvalError;

/// One classification task over a labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotTask {
    /// Task name (the key of its result).
    pub name: String,
    /// Field of each sample's `json` member holding the class index (WebDataset input).
    #[serde(default)]
    pub label_key: String,
    /// Class names, in label order.
    pub classnames: Vec<String>,
    /// Prompt templates; `{}` is replaced by the class name.
    pub templates: Vec<String>,
}

/// A zero-shot description file (`zeroshot.json`, as `distclip synth` writes it): the labelled
/// WebDataset and its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotFile {
    /// Shard spec of the labelled set.
    pub spec: String,
    /// Tasks over it.
    pub tasks: Vec<ZeroShotTask>,
}

impl ZeroShotFile {
    /// Read and check a task file. A relative `spec` is taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let err = |message: String| EvalError::Tasks { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut f: ZeroShotFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if f.spec.is_empty() {
            return Err(err("`spec` is empty: name the labelled shards".into()));
        }
        if !f.spec.contains("://")
            && !Path::new(&f.spec).is_absolute()
            && let Some(dir) = path.parent()
        {
            f.spec = dir.join(&f.spec).display().to_string();
        }
        for t in &f.tasks {
            if t.classnames.is_empty() || t.templates.is_empty() {
                return Err(err(format!("task {:?} needs class names and templates", t.name)));
            }
            if t.label_key.is_empty() {
                return Err(err(format!("task {:?} needs a `label_key` (the JSON field with the class index)", t.name)));
            }
        }
        Ok(f)
    }
}

/// Top-1 and top-5 accuracy over `samples` images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accuracy {
    /// Fraction whose best class is right.
    pub top1: f64,
    /// Fraction whose right class is among the best five (1.0 with five classes or fewer).
    pub top5: f64,
    /// Images scored.
    pub samples: usize,
    /// Accuracy of guessing: 1 / classes.
    pub chance: f64,
}

/// The classifier: one normalised row per class, the mean of the normalised embeddings of the
/// class name in every template, normalised again (`build_zero_shot_classifier`). `classes × d`.
pub fn classifier(model: &Clip, device: &Device, classnames: &[String], templates: &[String]) -> Result<Vec<f32>, EvalError> {
    let mut out = Vec::new();
    for c in classnames {
        let texts: Vec<String> = templates.iter().map(|t| t.replace("{}", c)).collect();
        let f = encode_texts(model, device, &texts, 256)?;
        let d = f.len() / texts.len();
        let mut mean = vec![0f32; d];
        for row in f.chunks(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / texts.len() as f32;
            }
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        out.extend(mean.iter().map(|v| v / norm));
    }
    Ok(out)
}

/// Accuracy of `features` (`n × d`, normalised) against `classifier` (`classes × d`).
pub fn accuracy_from_features(features: &[f32], labels: &[usize], classifier: &[f32], classes: usize) -> Accuracy {
    let d = classifier.len() / classes.max(1);
    let n = labels.len();
    let (mut top1, mut top5) = (0usize, 0usize);
    for (row, &label) in features.chunks(d).zip(labels) {
        let scores: Vec<f32> = classifier.chunks(d).map(|c| c.iter().zip(row).map(|(a, b)| a * b).sum()).collect();
        // Rank of the true class: how many classes score strictly higher (torch.topk order).
        let better = scores.iter().filter(|&&s| s > scores[label]).count();
        top1 += usize::from(better == 0);
        top5 += usize::from(better < 5);
    }
    Accuracy {
        top1: top1 as f64 / n.max(1) as f64,
        top5: top5 as f64 / n.max(1) as f64,
        samples: n,
        chance: 1.0 / classes.max(1) as f64,
    }
}

/// Zero-shot accuracy of every task on a labelled WebDataset (labels from each sample's JSON
/// member, field `label_key`). Samples without a valid label are skipped.
pub fn zero_shot_webdataset(
    model: &Clip,
    device: &Device,
    file: &ZeroShotFile,
    opts: &EvalOptions,
) -> Result<Vec<(String, Accuracy)>, EvalError> {
    let classifiers: Vec<Vec<f32>> = file
        .tasks
        .iter()
        .map(|t| classifier(model, device, &t.classnames, &t.templates))
        .collect::<Result<_, _>>()?;
    let mut features = Vec::new();
    let mut labels: Vec<Vec<Option<usize>>> = vec![Vec::new(); file.tasks.len()];
    read_pairs(&file.spec, model.image_size(), opts, |pairs| {
        let images: Vec<f32> = pairs.iter().flat_map(|p| p.image.iter().copied()).collect();
        features.extend(encode_images(model, device, &images, pairs.len())?);
        for (t, task) in file.tasks.iter().enumerate() {
            labels[t].extend(pairs.iter().map(|p| {
                p.json
                    .as_ref()
                    .and_then(|j| j.get(&task.label_key))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
                    .filter(|&v| v < task.classnames.len())
            }));
        }
        Ok(())
    })?;
    let mut out = Vec::new();
    for (t, task) in file.tasks.iter().enumerate() {
        let d = classifiers[t].len() / task.classnames.len();
        let (mut feats, mut labs) = (Vec::new(), Vec::new());
        for (row, l) in features.chunks(d).zip(&labels[t]) {
            if let Some(l) = l {
                feats.extend_from_slice(row);
                labs.push(*l);
            }
        }
        if labs.is_empty() {
            return Err(EvalError::Empty(format!("{} (no sample has a valid `{}`)", file.spec, task.label_key)));
        }
        out.push((task.name.clone(), accuracy_from_features(&feats, &labs, &classifiers[t], task.classnames.len())));
    }
    Ok(out)
}

/// OpenCLIP's default single template when a folder comes without templates.
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

/// Zero-shot accuracy on an image folder with one subfolder per class (the subfolder name, with
/// `_` read as a space, is the class name), ImageNet-style.
pub fn zero_shot_folder(
    model: &Clip,
    device: &Device,
    dir: &Path,
    templates: &[String],
    opts: &EvalOptions,
) -> Result<Accuracy, EvalError> {
    let err = |m: String| EvalError::Input(format!("zero-shot folder {}: {m}", dir.display()));
    let mut classes: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.len() < 2 {
        return Err(err("needs at least two class subfolders".into()));
    }
    let names: Vec<String> = classes.iter().map(|c| c.replace('_', " ")).collect();
    let templates = if templates.is_empty() { vec![DEFAULT_TEMPLATE.to_owned()] } else { templates.to_vec() };
    let cls = classifier(model, device, &names, &templates)?;
    let size = model.image_size();
    let mut files = Vec::new();
    for (label, c) in classes.iter().enumerate() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(c))
            .map_err(|e| err(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        files.extend(entries.into_iter().map(|p| (p, label)));
    }
    files.truncate(opts.max_samples.unwrap_or(usize::MAX));
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for chunk in files.chunks(opts.batch_size.max(1)) {
        use rayon::prelude::*;
        let images: Vec<Option<Vec<f32>>> = chunk
            .par_iter()
            .map(|(p, _)| {
                let bytes = std::fs::read(p).ok()?;
                let img = distclip_image::decode(&bytes, opts.max_pixels).ok()?;
                let rgb = if img.channels == 3 { img } else { img.to_rgb() };
                distclip_image::eval_transform(&rgb, size).ok()
            })
            .collect();
        let mut batch = Vec::new();
        for (img, (p, label)) in images.into_iter().zip(chunk) {
            match img {
                Some(v) => {
                    batch.extend(v);
                    labels.push(*label);
                }
                None => tracing::warn!("skipping {}: not a readable image", p.display()),
            }
        }
        let n = batch.len() / (3 * size * size);
        if n > 0 {
            features.extend(encode_images(model, device, &batch, n)?);
        }
    }
    if labels.is_empty() {
        return Err(EvalError::Empty(dir.display().to_string()));
    }
    Ok(accuracy_from_features(&features, &labels, &cls, classes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_ranks() {
        // 3 classes in 2-d, unit vectors; two images.
        let cls = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let feats = [0.9, 0.1, 0.1, 0.9];
        let acc = accuracy_from_features(&feats, &[0, 0], &cls, 3);
        assert_eq!(acc.top1, 0.5);
        assert_eq!(acc.top5, 1.0);
        assert_eq!(acc.samples, 2);
        assert!((acc.chance - 1.0 / 3.0).abs() < 1e-12);
    }
}
