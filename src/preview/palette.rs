//! Colours: one fixed colour per class id (the overlays and the legend both take it from [`class_color`]) and the
//! CT display window.

/// Colour of class `id` (1..=254): golden-angle hues (each id 0.618 of a turn from the previous one) with three
/// saturations and three brightness levels, so neighbouring ids and the bundle's 132 classes differ visibly
/// (the closest two of ids 1..=132 are 26 apart in RGB). Ids 133..=254 (zero-shot classes) reuse the same rule
/// and may come close to an earlier id; the legend's names tell them apart. Fixed: the same id has the same colour
/// in every preview.
pub fn class_color(id: u8) -> [u8; 3] {
    static TABLE: std::sync::OnceLock<[[u8; 3]; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| compute_class_color(i as u8)))[usize::from(id)]
}

fn compute_class_color(id: u8) -> [u8; 3] {
    const SATURATION: [f64; 3] = [0.9, 0.6, 0.75];
    const VALUE: [f64; 3] = [1.0, 0.85, 0.7];
    let i = f64::from(id);
    let hue = (i * 0.618_033_988_749_895).fract();
    let s = SATURATION[usize::from(id) % 3];
    let v = VALUE[(usize::from(id) / 3) % 3];
    hsv_to_rgb(hue, s, v)
}

/// HSV (all in 0..=1) to 8-bit RGB.
fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [u8; 3] {
    let h6 = (h * 6.0) % 6.0;
    let sector = h6.floor();
    let f = h6 - sector;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    let (r, g, b) = match sector as u8 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|c| (c * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// A CT display window (Hounsfield units): values below `level - width / 2` are black, above `level + width / 2`
/// white, linear in between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Width of the window (HU), > 0.
    pub width: f32,
    /// Centre of the window (HU).
    pub level: f32,
}

impl Window {
    /// The soft-tissue window: W 400 / L 40 (-160..240 HU).
    pub const SOFT_TISSUE: Window = Window {
        width: 400.0,
        level: 40.0,
    };

    /// Grey level of a CT value: `floor(clamp((v - (level - width / 2)) / width, 0, 1) * 255 + 0.5)`, computed in
    /// `f32`; NaN is black.
    pub fn grey(&self, v: f32) -> u8 {
        if v.is_nan() {
            return 0;
        }
        let t = ((v - (self.level - self.width / 2.0)) / self.width).clamp(0.0, 1.0);
        (t * 255.0 + 0.5) as u8
    }
}

/// `grey` tinted towards `color` by `alpha` (0..=1; 0 = grey, 1 = colour): `floor(g + alpha * (c - g) + 0.5)` per
/// channel, in `f32`.
pub fn blend(grey: u8, color: [u8; 3], alpha: f32) -> [u8; 3] {
    let g = f32::from(grey);
    color.map(|c| (g + alpha * (f32::from(c) - g) + 0.5) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distance(a: [u8; 3], b: [u8; 3]) -> f64 {
        (0..3)
            .map(|i| (f64::from(a[i]) - f64::from(b[i])).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn the_bundle_classes_have_distinct_saturated_colours() {
        let mut closest = f64::INFINITY;
        for a in 1..=132u8 {
            let ca = class_color(a);
            let spread = ca.iter().max().unwrap() - ca.iter().min().unwrap();
            assert!(
                spread >= 60,
                "class {a} colour {ca:?} is too grey to see on CT"
            );
            for b in (a + 1)..=132u8 {
                closest = closest.min(distance(ca, class_color(b)));
            }
        }
        assert!(closest > 25.0, "two classes are only {closest} apart");
        assert_eq!(class_color(3), class_color(3));
        assert_eq!(hsv_to_rgb(0.0, 1.0, 1.0), [255, 0, 0]);
        assert!((0..=255u8).all(|i| class_color(i) == compute_class_color(i)));
        assert_eq!(hsv_to_rgb(2.0 / 3.0, 1.0, 1.0), [0, 0, 255]);
    }

    #[test]
    fn soft_tissue_window_and_blending() {
        let w = Window::SOFT_TISSUE;
        assert_eq!(w.grey(-1000.0), 0);
        assert_eq!(w.grey(-160.0), 0);
        assert_eq!(w.grey(40.0), 128);
        assert_eq!(w.grey(240.0), 255);
        assert_eq!(w.grey(3000.0), 255);
        assert_eq!(w.grey(f32::NAN), 0);
        assert_eq!(blend(100, [200, 0, 100], 0.5), [150, 50, 100]);
        assert_eq!(blend(7, [1, 2, 3], 0.0), [7, 7, 7]);
    }
}
