//! The one font plots use, embedded so that text renders on machines without fonts.

use std::sync::OnceLock;

use plotters::style::{FontStyle, register_font};

/// DejaVu Sans 2.37 (licence in `fonts/LICENSE-DejaVu.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// The family every text style names. Plotters' own defaults (legend, tick labels) ask for
/// `sans-serif`, so the font is registered under that name rather than a private one.
pub(crate) const FAMILY: &str = "sans-serif";

/// Register the embedded font with plotters once per process (its font table is global).
pub(crate) fn ensure_registered() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if ok { Ok(()) } else { Err("the embedded DejaVu Sans font cannot be parsed".into()) }
}
