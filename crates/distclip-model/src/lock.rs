//! Tower locking (LiT, <https://arxiv.org/abs/2111.07991>): which parameters a run trains, by
//! OpenCLIP 3.3.0's groups, decided from the parameter's state-dict name alone.
//!
//! * Image tower (`VisionTransformer.lock`, `transformer.py`): groups are
//!   `[conv1, class_embedding, positional_embedding, ln_pre]`, each block but the last,
//!   `[last block, ln_post]`, `proj`; the last `unlocked_groups` stay trainable
//!   (Python's `groups[-k:]`, so a k beyond the count unlocks all).
//! * Text tower (`lock_text_tower`): `[token_embedding, positional_embedding]`, each block but
//!   the last, `[last block, ln_final]`, `text_projection`; the last `unlocked_layers` groups
//!   stay trainable. OpenCLIP's built-in text tower always freezes LayerNorms with their group
//!   (`freeze_layer_norm` must be true there); with `text_freeze_layer_norm = false` distclip
//!   leaves the LayerNorms of locked groups trainable, as OpenCLIP's HF text tower does.
//!
//! `logit_scale` and `logit_bias` belong to neither tower and are always trained.

/// A run's locking choice (OpenCLIP's `--lock-image*` / `--lock-text*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locking {
    /// `Some(k)`: the image tower is locked except its last `k` groups.
    pub image_unlocked_groups: Option<usize>,
    /// `Some(k)`: the text tower is locked except its last `k` groups.
    pub text_unlocked_layers: Option<usize>,
    /// Freeze the LayerNorms of locked text groups too (OpenCLIP's only mode for its built-in
    /// text tower).
    pub text_freeze_layer_norm: bool,
}

impl Default for Locking {
    fn default() -> Self {
        Locking {
            image_unlocked_groups: None,
            text_unlocked_layers: None,
            text_freeze_layer_norm: true,
        }
    }
}

/// The group of a block-structured tower a name (with the tower's prefix removed) falls in:
/// 0 for the stem, `1 + i` for block `i < layers - 1`, `layers` for the last block and the
/// final norm, `layers + 1` for the projection. `None`: not a parameter of this tower.
fn group(rest: &str, layers: usize, stem: &[&str], final_norm: &str, proj: &str) -> Option<usize> {
    let first = rest.split('.').next().unwrap_or(rest);
    if stem.contains(&first) {
        return Some(0);
    }
    if first == final_norm {
        return Some(layers);
    }
    if first == proj {
        return Some(layers + 1);
    }
    let block = rest.strip_prefix("transformer.resblocks.")?;
    let i: usize = block.split('.').next()?.parse().ok()?;
    Some(if i + 1 < layers { 1 + i } else { layers })
}

/// Whether group `g` of `count` groups is among the last `unlocked`.
fn unlocked(g: usize, count: usize, unlocked: usize) -> bool {
    g >= count.saturating_sub(unlocked)
}

impl Locking {
    /// Whether any tower is locked.
    pub fn any(&self) -> bool {
        self.image_unlocked_groups.is_some() || self.text_unlocked_layers.is_some()
    }

    /// Whether the parameter called `name` (OpenCLIP spelling) is trained, for towers of
    /// `vision_layers` and `text_layers` blocks.
    pub fn trainable(&self, name: &str, vision_layers: usize, text_layers: usize) -> bool {
        if let Some(rest) = name.strip_prefix("visual.") {
            let Some(k) = self.image_unlocked_groups else { return true };
            let g = group(rest, vision_layers, &["conv1", "class_embedding", "positional_embedding", "ln_pre"], "ln_post", "proj");
            return g.is_some_and(|g| unlocked(g, vision_layers + 2, k));
        }
        let g = group(name, text_layers, &["token_embedding", "positional_embedding"], "ln_final", "text_projection");
        let (Some(g), Some(k)) = (g, self.text_unlocked_layers) else {
            // logit_scale / logit_bias, or an unlocked text tower.
            return true;
        };
        if unlocked(g, text_layers + 2, k) {
            return true;
        }
        !self.text_freeze_layer_norm && name.split('.').any(|part| part.starts_with("ln_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(image: Option<usize>, text: Option<usize>) -> Locking {
        Locking {
            image_unlocked_groups: image,
            text_unlocked_layers: text,
            text_freeze_layer_norm: true,
        }
    }

    #[test]
    fn image_groups_follow_vision_transformer_lock() {
        let t = |l: Locking, n: &str| l.trainable(n, 3, 2);
        let all = lock(Some(0), None);
        for n in ["visual.conv1.weight", "visual.proj", "visual.ln_post.bias", "visual.transformer.resblocks.2.ln_1.weight"] {
            assert!(!t(all, n), "{n}");
        }
        assert!(t(all, "logit_scale") && t(all, "token_embedding.weight") && t(all, "transformer.resblocks.0.ln_1.weight"));
        let one = lock(Some(1), None);
        assert!(t(one, "visual.proj") && !t(one, "visual.ln_post.weight"));
        let two = lock(Some(2), None);
        assert!(t(two, "visual.ln_post.weight") && t(two, "visual.transformer.resblocks.2.mlp.c_fc.weight"));
        assert!(!t(two, "visual.transformer.resblocks.1.mlp.c_fc.weight"));
        let three = lock(Some(3), None);
        assert!(t(three, "visual.transformer.resblocks.1.attn.in_proj_weight"));
        assert!(!t(three, "visual.transformer.resblocks.0.attn.in_proj_weight") && !t(three, "visual.class_embedding"));
        // Python's groups[-k:] with k past the count is every group.
        let many = lock(Some(99), None);
        assert!(t(many, "visual.conv1.weight") && t(many, "visual.positional_embedding"));
    }

    #[test]
    fn text_groups_follow_lock_text_tower() {
        let t = |l: Locking, n: &str| l.trainable(n, 2, 3);
        let all = lock(None, Some(0));
        for n in ["token_embedding.weight", "positional_embedding", "transformer.resblocks.2.ln_2.bias", "ln_final.weight", "text_projection"] {
            assert!(!t(all, n), "{n}");
        }
        assert!(t(all, "logit_scale") && t(all, "visual.proj"));
        let two = lock(None, Some(2));
        assert!(t(two, "text_projection") && t(two, "ln_final.bias") && t(two, "transformer.resblocks.2.attn.out_proj.weight"));
        assert!(!t(two, "transformer.resblocks.1.attn.out_proj.weight") && !t(two, "token_embedding.weight"));
        // A Linear text projection (proj_bias) is one group with its bias.
        assert!(t(lock(None, Some(1)), "text_projection.bias") && !t(lock(None, Some(1)), "ln_final.weight"));
        let norms = Locking { text_freeze_layer_norm: false, ..all };
        assert!(t(norms, "transformer.resblocks.0.ln_1.weight") && t(norms, "ln_final.bias"));
        assert!(!t(norms, "transformer.resblocks.0.mlp.c_fc.weight") && !t(norms, "token_embedding.weight"));
    }

    #[test]
    fn nothing_is_locked_by_default() {
        let l = Locking::default();
        assert!(!l.any());
        assert!(l.trainable("visual.conv1.weight", 2, 2) && l.trainable("ln_final.weight", 2, 2));
    }
}
