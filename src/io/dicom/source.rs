//! Where DICOM files come from: a folder searched recursively, a `.zip` of one, or a single file. Each file is
//! read twice: once up to the pixel data (headers, for grouping and geometry), once whole (pixels) for the
//! slices of the chosen series.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::DicomError;

/// A zip member larger than this is refused (no CT slice is near it; it guards against zip bombs).
const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// Extensions of files that claim to be DICOM: such a file without the `DICM` marker is an error, not skipped.
const DICOM_EXTENSIONS: [&str; 3] = ["dcm", "dicom", "ima"];

/// One candidate DICOM file.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    /// A file on disk.
    File(PathBuf),
    /// Member `index` (named `name`) of the zip archive `archive`.
    Zip {
        archive: PathBuf,
        index: usize,
        name: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Zip { archive, name, .. } => write!(f, "{}!{name}", archive.display()),
        }
    }
}

/// The candidate files of an input (folder, zip or single file), in a stable order, and the names of the files
/// that were skipped because they are not DICOM.
pub(crate) struct Listing {
    pub files: Vec<Location>,
    pub skipped: Vec<String>,
}

/// Whether `path` is an input this module reads: a folder, a `.zip`, or a file with the DICOM `DICM` marker.
pub(crate) fn is_dicom_input(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    if is_zip(path) {
        return path.is_file();
    }
    match File::open(path) {
        Ok(mut f) => has_dicm_marker(&mut f).unwrap_or(false),
        Err(_) => false,
    }
}

/// A `.zip` by name, or a file that starts with a zip's local file header (an upload spooled without a name).
fn is_zip(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    path.is_file()
        && File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
        && magic == *b"PK\x03\x04"
}

fn claims_dicom(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DICOM_EXTENSIONS.iter().any(|d| e.eq_ignore_ascii_case(d)))
}

/// Reads the first 132 bytes and checks for `DICM` at offset 128 (PS3.10 file format).
fn has_dicm_marker(r: &mut impl Read) -> std::io::Result<bool> {
    let mut head = [0u8; 132];
    let mut filled = 0;
    while filled < head.len() {
        let n = r.read(&mut head[filled..])?;
        if n == 0 {
            return Ok(false);
        }
        filled += n;
    }
    Ok(&head[128..132] == b"DICM")
}

/// Lists the candidate files of `path`.
pub(crate) fn list(path: &Path) -> Result<Listing, DicomError> {
    let io = |e: std::io::Error| DicomError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mut listing = Listing {
        files: Vec::new(),
        skipped: Vec::new(),
    };
    if meta.is_dir() {
        let mut paths = Vec::new();
        walk(path, &mut paths)?;
        paths.sort();
        for p in paths {
            let mut f = File::open(&p).map_err(|e| DicomError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            let marker = has_dicm_marker(&mut f).map_err(|e| DicomError::Io {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            classify(marker, Location::File(p), &mut listing)?;
        }
    } else if is_zip(path) {
        let file = File::open(path).map_err(io)?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| DicomError::Zip {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        for index in 0..archive.len() {
            let mut member = archive.by_index(index).map_err(|e| DicomError::Zip {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let name = member.name().to_string();
            if member.is_dir() || name.starts_with("__MACOSX/") || is_hidden(&name) {
                continue;
            }
            let loc = Location::Zip {
                archive: path.to_path_buf(),
                index,
                name,
            };
            let marker = has_dicm_marker(&mut member).map_err(|e| DicomError::Corrupt {
                path: loc.to_string(),
                reason: format!("cannot read the zip member: {e}"),
            })?;
            classify(marker, loc, &mut listing)?;
        }
    } else {
        let mut f = File::open(path).map_err(io)?;
        let marker = has_dicm_marker(&mut f).map_err(io)?;
        if !marker {
            return Err(DicomError::NotDicom {
                path: path.display().to_string(),
                reason: "no DICM marker at byte 128 (not a DICOM Part 10 file)".into(),
            });
        }
        listing.files.push(Location::File(path.to_path_buf()));
    }
    Ok(listing)
}

fn is_hidden(name: &str) -> bool {
    Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Keeps DICOM files; skips other files, unless their name says they are DICOM (then they are corrupt).
fn classify(marker: bool, loc: Location, listing: &mut Listing) -> Result<(), DicomError> {
    let name = match &loc {
        Location::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
        Location::Zip { name, .. } => Some(name.clone()),
    }
    .unwrap_or_default();
    if marker {
        listing.files.push(loc);
    } else if claims_dicom(&name) {
        return Err(DicomError::NotDicom {
            path: loc.to_string(),
            reason: "no DICM marker at byte 128 (truncated, or not a DICOM Part 10 file)".into(),
        });
    } else {
        listing.skipped.push(loc.to_string());
    }
    Ok(())
}

/// Regular files under `dir`, recursively; hidden files and folders are skipped, symbolic links to folders
/// are not followed (no cycles).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DicomError> {
    let io = |p: &Path, e: std::io::Error| DicomError::Io {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let ft = entry.file_type().map_err(|e| io(&p, e))?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if ft.is_file() || (ft.is_symlink() && p.is_file()) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads one file's data set: up to (not including) the pixel data when `pixels` is false, whole otherwise.
pub(crate) fn open(loc: &Location, pixels: bool) -> Result<DefaultDicomObject, DicomError> {
    let options = || {
        let o = OpenFileOptions::new();
        if pixels {
            o.read_all()
        } else {
            o.read_until(tags::PIXEL_DATA)
        }
    };
    let corrupt = |e: &dyn std::fmt::Display| DicomError::Corrupt {
        path: loc.to_string(),
        reason: format!("cannot parse the DICOM data set: {e}"),
    };
    match loc {
        Location::File(p) => options().open_file(p).map_err(|e| corrupt(&e)),
        Location::Zip { .. } => {
            let bytes = read_member(loc)?;
            options().from_reader(&bytes[..]).map_err(|e| corrupt(&e))
        }
    }
}

/// The bytes of a zip member.
pub(crate) fn read_member(loc: &Location) -> Result<Vec<u8>, DicomError> {
    let (archive, index) = match loc {
        Location::Zip { archive, index, .. } => (archive, index),
        Location::File(p) => {
            return Err(DicomError::Io {
                path: p.display().to_string(),
                reason: "not a zip member".into(),
            })
        }
    };
    let file = File::open(archive).map_err(|e| DicomError::Io {
        path: archive.display().to_string(),
        reason: e.to_string(),
    })?;
    read_member_from(file, *index, loc)
}

fn read_member_from<R: Read + Seek>(
    reader: R,
    index: usize,
    loc: &Location,
) -> Result<Vec<u8>, DicomError> {
    let zip_err = |e: &dyn std::fmt::Display| DicomError::Zip {
        path: loc.to_string(),
        reason: e.to_string(),
    };
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| zip_err(&e))?;
    let member = archive.by_index(index).map_err(|e| zip_err(&e))?;
    if member.size() > MAX_MEMBER_BYTES {
        return Err(DicomError::Zip {
            path: loc.to_string(),
            reason: format!(
                "member of {} bytes (more than {MAX_MEMBER_BYTES}): not a CT slice",
                member.size()
            ),
        });
    }
    let mut bytes = Vec::with_capacity(member.size() as usize);
    member
        .take(MAX_MEMBER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DicomError::Corrupt {
            path: loc.to_string(),
            reason: format!("cannot decompress the zip member: {e}"),
        })?;
    Ok(bytes)
}
