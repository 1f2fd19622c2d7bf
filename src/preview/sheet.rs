//! Contact sheet: one thumbnail per case in a grid with the case's name, failed cases framed in red with a short
//! reason, under a header counting cases and failures; for reviewing a whole batch in one picture.

use std::path::Path;

use image::imageops::FilterType;
use image::RgbImage;

use super::geometry::Rect;
use super::{fill_rect, save_png, text, PreviewError, BACKGROUND, GAP, PAD, TEXT_COLOR};

/// Most cases on one sheet (about 140 MB of pixels at the default cell size); split larger runs into pages.
pub const MAX_SHEET_ITEMS: usize = 1000;
/// Frame and text colour of failed cases.
pub const FAILED_COLOR: [u8; 3] = [230, 40, 40];
/// Frame colour of the other cases.
pub const FRAME_COLOR: [u8; 3] = [70, 70, 70];
const REASON_COLOR: [u8; 3] = [255, 150, 150];
const FAILED_FILL: [u8; 3] = [50, 12, 12];
const BORDER: u32 = 3;
const INSET: u32 = 4;

/// One case of a contact sheet.
#[derive(Debug, Clone)]
pub struct SheetItem {
    /// The case's name (e.g. its input path relative to the batch root).
    pub name: String,
    /// Its picture (typically a [`super::PreviewOptions::thumbnail`] render), scaled down to fit the cell.
    pub image: Option<RgbImage>,
    /// Why it failed; `None` for a case that succeeded.
    pub failure: Option<String>,
}

impl SheetItem {
    /// A case that succeeded, with its picture.
    pub fn ok(name: impl Into<String>, image: RgbImage) -> Self {
        Self {
            name: name.into(),
            image: Some(image),
            failure: None,
        }
    }

    /// A case that failed, with the reason (its first line is shown, shortened to fit).
    pub fn failed(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            image: None,
            failure: Some(reason.into()),
        }
    }
}

/// Size of a contact sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetOptions {
    /// Cells per row (fewer when there are fewer cases).
    pub columns: u32,
    /// Largest thumbnail width in pixels (pictures are scaled down, never up, keeping their aspect).
    pub thumb_width: u32,
    /// Largest thumbnail height in pixels.
    pub thumb_height: u32,
    /// Text size in pixels.
    pub font_px: u32,
    /// Shown in the header before the counts.
    pub title: Option<String>,
}

impl Default for SheetOptions {
    fn default() -> Self {
        Self {
            columns: 4,
            thumb_width: 360,
            thumb_height: 150,
            font_px: 12,
            title: None,
        }
    }
}

/// One cell of a contact sheet.
#[derive(Debug, Clone, PartialEq)]
pub struct SheetCell {
    /// The whole cell, frame included.
    pub rect: Rect,
    /// Where the case's picture was drawn, if it had one.
    pub thumbnail: Option<Rect>,
    /// Whether the case failed (red frame).
    pub failed: bool,
}

/// A rendered contact sheet.
#[derive(Debug, Clone)]
pub struct ContactSheet {
    /// The picture.
    pub image: RgbImage,
    /// One cell per case, in the order given, row by row.
    pub cells: Vec<SheetCell>,
}

/// Renders a contact sheet of `items` (at least one, at most [`MAX_SHEET_ITEMS`]).
pub fn contact_sheet(
    items: &[SheetItem],
    opts: &SheetOptions,
) -> Result<ContactSheet, PreviewError> {
    if items.is_empty() {
        return Err(PreviewError::NoItems);
    }
    if items.len() > MAX_SHEET_ITEMS {
        return Err(PreviewError::TooManyItems {
            count: items.len(),
            max: MAX_SHEET_ITEMS,
        });
    }
    if !(1..=64).contains(&opts.columns)
        || !(32..=2048).contains(&opts.thumb_width)
        || !(32..=2048).contains(&opts.thumb_height)
        || !(8..=48).contains(&opts.font_px)
    {
        return Err(PreviewError::InvalidOption(format!(
            "contact sheet: columns 1..=64, thumbnails 32..=2048 pixels, font 8..=48 pixels; got {opts:?}"
        )));
    }
    let font = opts.font_px as f32;
    let reason_font = (font - 1.0).max(8.0);
    let line = text::line_height(font);
    let reason_line = text::line_height(reason_font) + 2;
    let header_px = font * 1.25;
    let header_h = text::line_height(header_px) + 8;
    let cell_w = opts.thumb_width + 2 * (BORDER + INSET);
    let cell_h = 2 * (BORDER + INSET) + opts.thumb_height + 4 + line + 2 * reason_line;
    let n = items.len() as u32;
    let cols = opts.columns.min(n);
    let rows = n.div_ceil(cols);
    let width = 2 * PAD + cols * cell_w + (cols - 1) * GAP;
    let height = 2 * PAD + header_h + rows * cell_h + (rows - 1) * GAP;
    let mut image = RgbImage::from_pixel(width, height, image::Rgb(BACKGROUND));

    let failed = items.iter().filter(|i| i.failure.is_some()).count();
    let counts = format!(
        "{} case{}, {failed} failed",
        items.len(),
        if items.len() == 1 { "" } else { "s" }
    );
    let header = match &opts.title {
        Some(t) => format!("{t}: {counts}"),
        None => counts,
    };
    let header = text::fit(&header, header_px, (width - 2 * PAD) as f32);
    let header_color = if failed > 0 { FAILED_COLOR } else { TEXT_COLOR };
    text::draw(
        &mut image,
        &header,
        PAD as f32,
        PAD as f32,
        header_px,
        header_color,
    );

    let inner_w = opts.thumb_width as f32;
    let mut cells = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (col, row) = (i as u32 % cols, i as u32 / cols);
        let rect = Rect {
            x: PAD + col * (cell_w + GAP),
            y: PAD + header_h + row * (cell_h + GAP),
            width: cell_w,
            height: cell_h,
        };
        let is_failed = item.failure.is_some();
        fill_rect(
            &mut image,
            rect,
            if is_failed { FAILED_COLOR } else { FRAME_COLOR },
        );
        fill_rect(
            &mut image,
            Rect {
                x: rect.x + BORDER,
                y: rect.y + BORDER,
                width: rect.width - 2 * BORDER,
                height: rect.height - 2 * BORDER,
            },
            BACKGROUND,
        );
        let area = Rect {
            x: rect.x + BORDER + INSET,
            y: rect.y + BORDER + INSET,
            width: opts.thumb_width,
            height: opts.thumb_height,
        };
        let picture = item
            .image
            .as_ref()
            .filter(|img| img.width() > 0 && img.height() > 0);
        let thumbnail = match picture {
            Some(img) => Some(paste_fitted(&mut image, img, area)),
            None => {
                let (label, color) = if is_failed {
                    fill_rect(&mut image, area, FAILED_FILL);
                    ("FAILED", FAILED_COLOR)
                } else {
                    ("no preview", TEXT_COLOR)
                };
                text::draw_centred(
                    &mut image,
                    label,
                    (area.x + area.width / 2) as f32,
                    (area.y + area.height / 2) as f32,
                    font * 2.0,
                    color,
                );
                None
            }
        };
        let text_y = area.y + area.height + 4;
        let name = text::fit(&item.name, font, inner_w);
        let name_color = if is_failed { FAILED_COLOR } else { TEXT_COLOR };
        text::draw(
            &mut image,
            &name,
            area.x as f32,
            text_y as f32,
            font,
            name_color,
        );
        if let Some(reason) = &item.failure {
            let first = reason
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed");
            for (k, l) in text::wrap(first, reason_font, inner_w, 2)
                .iter()
                .enumerate()
            {
                text::draw(
                    &mut image,
                    l,
                    area.x as f32,
                    (text_y + line + 2 + k as u32 * reason_line) as f32,
                    reason_font,
                    REASON_COLOR,
                );
            }
        }
        cells.push(SheetCell {
            rect,
            thumbnail,
            failed: is_failed,
        });
    }
    Ok(ContactSheet { image, cells })
}

/// Copies `img` into `area`, scaled down (box-filtered) to fit, keeping its aspect, centred. Returns where it went.
fn paste_fitted(canvas: &mut RgbImage, img: &RgbImage, area: Rect) -> Rect {
    let f = (f64::from(area.width) / f64::from(img.width()))
        .min(f64::from(area.height) / f64::from(img.height()))
        .min(1.0);
    let w = ((f64::from(img.width()) * f).round() as u32).clamp(1, area.width);
    let h = ((f64::from(img.height()) * f).round() as u32).clamp(1, area.height);
    let resized;
    let src = if (w, h) == img.dimensions() {
        img
    } else {
        resized = image::imageops::resize(img, w, h, FilterType::Triangle);
        &resized
    };
    let at = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    image::imageops::replace(canvas, src, i64::from(at.x), i64::from(at.y));
    at
}

/// Renders (see [`contact_sheet`]) and writes the sheet as a PNG at `path`, atomically.
pub fn write_contact_sheet(
    path: &Path,
    items: &[SheetItem],
    opts: &SheetOptions,
) -> Result<ContactSheet, PreviewError> {
    let sheet = contact_sheet(items, opts)?;
    save_png(path, &sheet.image)?;
    Ok(sheet)
}
