//! Text on an RGB image: DejaVu Sans embedded by the `dejavu` crate (no system fonts), rasterised with `ab_glyph`
//! (the font rasteriser the training plot uses through `plotters`), anti-aliased by coverage blending.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use image::RgbImage;

use super::geometry::Rect;

fn font() -> Option<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| {
        let f = FontRef::try_from_slice(dejavu::sans::regular()).ok();
        if f.is_none() {
            log::warn!("the embedded DejaVu font could not be read; previews have no text");
        }
        f
    })
    .as_ref()
}

/// Height of a line of text of size `px` (ascent + descent), in pixels.
pub fn line_height(px: f32) -> u32 {
    px.ceil() as u32
}

/// Width of `text` at size `px`, in pixels (advances and kerning).
pub fn width(text: &str, px: f32) -> f32 {
    let Some(f) = font() else { return 0.0 };
    let sf = f.as_scaled(PxScale::from(px));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            w += sf.kern(p, id);
        }
        w += sf.h_advance(id);
        prev = Some(id);
    }
    w
}

/// `text`, shortened with a trailing ellipsis where needed so that it is at most `max_width` pixels wide.
pub fn fit(text: &str, px: f32, max_width: f32) -> String {
    if width(text, px) <= max_width {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for n in (0..chars.len()).rev() {
        let s: String = chars[..n].iter().collect::<String>().trim_end().to_string() + "…";
        if width(&s, px) <= max_width {
            return s;
        }
    }
    String::new()
}

/// Splits `text` into at most `max_lines` lines of at most `max_width` pixels (at word boundaries where possible;
/// the last line ends with an ellipsis when text is left over).
pub fn wrap(text: &str, px: f32, max_width: f32, max_lines: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() && lines.len() < max_lines {
        let mut line = words[i].to_string();
        i += 1;
        while i < words.len() {
            let candidate = format!("{line} {}", words[i]);
            if width(&candidate, px) > max_width {
                break;
            }
            line = candidate;
            i += 1;
        }
        lines.push(line);
    }
    if i < words.len() {
        if let Some(last) = lines.last_mut() {
            // The next word did not fit, so this is too wide and ends with the ellipsis.
            *last = fit(&format!("{last} {}", words[i..].join(" ")), px, max_width);
        }
    }
    lines.into_iter().map(|l| fit(&l, px, max_width)).collect()
}

/// Draws `text` at size `px` with the top of its line at `y` and its left edge at `x` (both may lie partly outside
/// the image: pixels outside are skipped), blending `color` by glyph coverage. Returns the line's box.
pub fn draw(img: &mut RgbImage, text: &str, x: f32, y: f32, px: f32, color: [u8; 3]) -> Rect {
    let w = width(text, px);
    let rect = Rect {
        x: x.max(0.0) as u32,
        y: y.max(0.0) as u32,
        width: w.ceil() as u32,
        height: line_height(px),
    };
    let Some(f) = font() else { return rect };
    let sf = f.as_scaled(PxScale::from(px));
    let baseline = y + sf.ascent();
    let (iw, ih) = img.dimensions();
    let mut caret = x;
    let mut prev = None;
    for c in text.chars() {
        let id = sf.glyph_id(c);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        let glyph = id.with_scale_and_position(PxScale::from(px), point(caret, baseline));
        caret += sf.h_advance(id);
        prev = Some(id);
        let Some(outline) = f.outline_glyph(glyph) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let px_x = b.min.x as i64 + i64::from(gx);
            let px_y = b.min.y as i64 + i64::from(gy);
            if px_x < 0 || px_y < 0 || px_x >= i64::from(iw) || px_y >= i64::from(ih) {
                return;
            }
            let a = coverage.clamp(0.0, 1.0);
            let p = img.get_pixel_mut(px_x as u32, px_y as u32);
            for (channel, &target) in p.0.iter_mut().zip(&color) {
                let old = f32::from(*channel);
                *channel = (old + a * (f32::from(target) - old) + 0.5) as u8;
            }
        });
    }
    rect
}

/// Draws `text` centred on `(cx, cy)`. Returns the line's box.
pub fn draw_centred(
    img: &mut RgbImage,
    text: &str,
    cx: f32,
    cy: f32,
    px: f32,
    color: [u8; 3],
) -> Rect {
    let x = cx - width(text, px) / 2.0;
    let y = cy - line_height(px) as f32 / 2.0;
    draw(img, text, x, y, px, color)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_box_and_fitted() {
        let mut img = RgbImage::new(120, 40);
        let r = draw(&mut img, "Spleen 12 mL", 4.0, 6.0, 14.0, [255, 255, 255]);
        let mut lit = 0;
        for (x, y, p) in img.enumerate_pixels() {
            if p.0[0] > 0 {
                lit += 1;
                assert!(
                    x + 1 >= r.x && x <= r.x + r.width && y + 1 >= r.y && y <= r.y + r.height,
                    "pixel ({x}, {y}) outside the text box {r:?}"
                );
            }
        }
        assert!(lit > 80, "only {lit} pixels of text");
        assert!(width("WWWW", 14.0) > width("iiii", 14.0));
        let f = fit("a rather long class name", 13.0, 60.0);
        assert!(f.ends_with('…') && width(&f, 13.0) <= 60.0, "{f}");
        assert_eq!(fit("short", 13.0, 200.0), "short");
        let lines = wrap("one two three four five six seven eight", 13.0, 70.0, 2);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with('…'), "{lines:?}");
        assert!(lines.iter().all(|l| width(l, 13.0) <= 70.0));
    }
}
