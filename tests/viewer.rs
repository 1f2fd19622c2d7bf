//! The server's viewer page (`/`) driven in headless Chromium from Debian (`chromium`, `chromium-driver`; installed
//! by scripts/test.sh) through chromedriver's W3C WebDriver protocol, on loopback only: the page loads, asks for
//! the token and then lists the CT of the allowed folder; the chosen CT is drawn in the soft-tissue window (every
//! voxel of the shown slice checked against the file); a class is chosen and run, and the overlay appears exactly
//! where the API's label map says, in the previews' colours, with the class in the legend; clicks add positive
//! and negative points at the clicked voxel, drawn as markers, and a run with them draws that request's label
//! map; an uploaded CT gives the same result as the listed one. A screenshot is saved as
//! `target/test-artefacts/viewer.png`. Every wait is bounded; chromedriver, Chromium and the server are stopped
//! by Drop guards, also when the test fails.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::Array3;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use vista3d::io::read_nifti;
use vista3d::preview::geometry::Orientation;
use vista3d::preview::palette::{blend, class_color, Window};
use vista3d::preview::{
    PreviewOptions, HATCH_COLOR, HATCH_PERIOD, NEGATIVE_POINT, NOT_COMPUTED, POSITIVE_POINT,
};

mod common;
use common::{ServeProcess, FAST};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const TOKEN: &str = "viewer-test-token";
/// The W3C WebDriver key of element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn http() -> Client {
    // The crate builds reqwest with rustls but no default crypto provider: install ring's (as the server does).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// Waits up to `seconds` for `f` to give `Some`.
fn wait_for<T>(what: &str, seconds: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The server and chromedriver (killed when dropped).

/// The server with an allowed folder and a token (killed when dropped).
struct Server(ServeProcess);

impl std::ops::Deref for Server {
    type Target = ServeProcess;
    fn deref(&self) -> &ServeProcess {
        &self.0
    }
}

impl Server {
    fn start(dir: &Path, allowed: &Path, token_file: &Path) -> Server {
        let mut args: Vec<String> = [
            "--spool-dir",
            dir.to_str().unwrap(),
            "--allow-dir",
            allowed.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(FAST.iter().map(|s| s.to_string()));
        let server = Server(ServeProcess::start(&args, dir.join("server.log")));
        let c = http();
        wait_for("the server to be ready", 180, || {
            c.get(server.url("/v1/health/ready"))
                .send()
                .ok()
                .filter(|r| r.status() == 200)
        });
        server
    }

    /// The label map the API answers for `prompts` on the image at `path`, as `[x, y, z]` class ids.
    fn label_map(&self, path: &Path, prompts: &Value, scratch: &Path) -> Array3<f32> {
        let r = http()
            .post(self.url("/v1/vista3d/inference?format=nifti"))
            .bearer_auth(TOKEN)
            .json(&json!({"image": path.to_str().unwrap(), "prompts": prompts}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
        let file = scratch.join("labels.nii.gz");
        std::fs::write(&file, r.bytes().unwrap()).unwrap();
        read_nifti(&file).unwrap().volume.data
    }
}

struct Driver {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // Chromium's warnings and errors (the page's console errors among them).
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let severe: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("SEVERE") || l.contains("WARNING"))
                .collect();
            eprintln!(
                "--- chromedriver log: warnings and errors (last 20)\n{}",
                severe[severe.len().saturating_sub(20)..].join("\n")
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Driver {
    fn start(dir: &Path) -> Driver {
        let log = dir.join("chromedriver.log");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let c = http();
        wait_for("chromedriver to listen", 30, || {
            let r = c.get(format!("{}/status", driver.base)).send().ok()?;
            let v: Value = r.json().ok()?;
            v["value"]["ready"].as_bool().filter(|r| *r)
        });
        driver
    }
}

/// A WebDriver session: headless Chromium (closed when dropped).
struct Browser {
    http: Client,
    session: String,
}

impl Browser {
    fn open(driver: &Driver, profile: &Path) -> Browser {
        let http = http();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                    "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-extensions", "--force-device-scale-factor=1",
                    // Nothing but loopback: every other host goes to a proxy that does not exist.
                    "--proxy-server=127.0.0.1:9",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let r = http
            .post(format!("{}/session", driver.base))
            .json(&caps)
            .send()
            .unwrap();
        let v: Value = r.json().unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver could not start Chromium: {v}"))
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.base),
        }
    }

    /// A WebDriver command; its `value` (panics on a WebDriver error).
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let r = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body.unwrap_or(json!({}))),
        }
        .send()
        .unwrap();
        let status = r.status();
        let v: Value = r.json().unwrap();
        assert!(status.is_success(), "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    fn find(&self, css: &str) -> Value {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        json!({ELEMENT: v[ELEMENT].clone()})
    }

    fn id(element: &Value) -> String {
        element[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, element: &Value) {
        self.cmd(
            "POST",
            &format!("/element/{}/click", Self::id(element)),
            None,
        );
    }

    fn send_keys(&self, element: &Value, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{}/value", Self::id(element)),
            Some(json!({"text": text})),
        );
    }

    /// A real mouse click (button 0 left, 2 right) at viewport pixel (x, y).
    fn mouse_click(&self, x: i64, y: i64, button: u8) {
        self.cmd(
            "POST",
            "/actions",
            Some(json!({"actions": [{
                "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                "actions": [
                    {"type": "pointerMove", "duration": 0, "origin": "viewport", "x": x, "y": y},
                    {"type": "pointerDown", "button": button},
                    {"type": "pointerUp", "button": button},
                ],
            }]})),
        );
        self.cmd("DELETE", "/actions", None);
    }

    /// The page's status line and its state (`ok`, `error`, `done`).
    fn status(&self) -> (String, String) {
        let v = self.exec(
            "const s = document.getElementById('status'); return [s.textContent, s.dataset.state || ''];",
            json!([]),
        );
        (
            v[0].as_str().unwrap_or("").to_string(),
            v[1].as_str().unwrap_or("").to_string(),
        )
    }

    /// Waits for a run to finish; panics with the page's error if it failed.
    fn wait_run(&self) {
        let (text, state) = wait_for("the run to finish", 300, || {
            let (text, state) = self.status();
            (state == "done" || state == "error").then_some((text, state))
        });
        assert_eq!(state, "done", "the page reports: {text}");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.session).send();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// What the page shows.

/// The page's view of the volume (`window.vista3dViewer.view`).
#[derive(Debug)]
struct View {
    col_axis: usize,
    row_axis: usize,
    slice_axis: usize,
    cols: usize,
    rows: usize,
    flip_col: bool,
    flip_row: bool,
    width: f64,
    height: f64,
}

impl View {
    fn read(b: &Browser) -> Option<View> {
        let v = b.exec("return window.vista3dViewer.view;", json!([]));
        let u = |k: &str| v[k].as_u64().map(|x| x as usize);
        Some(View {
            col_axis: u("colAxis")?,
            row_axis: u("rowAxis")?,
            slice_axis: u("sliceAxis")?,
            cols: u("cols")?,
            rows: u("rows")?,
            flip_col: v["flipCol"].as_bool()?,
            flip_row: v["flipRow"].as_bool()?,
            width: v["width"].as_f64()?,
            height: v["height"].as_f64()?,
        })
    }

    /// The voxel shown at column `c`, row `r` of slice `s`.
    fn voxel(&self, c: usize, r: usize, s: usize) -> [usize; 3] {
        let mut v = [0; 3];
        v[self.col_axis] = if self.flip_col { self.cols - 1 - c } else { c };
        v[self.row_axis] = if self.flip_row { self.rows - 1 - r } else { r };
        v[self.slice_axis] = s;
        v
    }

    /// The canvas pixel at the centre of column `c`, row `r`.
    fn pixel(&self, c: usize, r: usize) -> (usize, usize) {
        (
            ((c as f64 + 0.5) * self.width / self.cols as f64) as usize,
            ((r as f64 + 0.5) * self.height / self.rows as f64) as usize,
        )
    }
}

fn current_slice(b: &Browser) -> usize {
    b.exec(
        "return Number(document.getElementById('slice').value);",
        json!([]),
    )
    .as_u64()
    .unwrap() as usize
}

/// RGB of canvas pixels.
fn canvas_pixels(b: &Browser, at: &[(usize, usize)]) -> Vec<[u8; 3]> {
    let v = b.exec(
        "const c = document.getElementById('canvas');
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
         return arguments[0].map(([x, y]) => { const o = 4 * (y * c.width + x); return [d[o], d[o + 1], d[o + 2]]; });",
        json!([at]),
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| std::array::from_fn(|i| p[i].as_u64().unwrap() as u8))
        .collect()
}

/// Checks every voxel of the shown slice (at the centre of its pixels): the CT's grey in the soft-tissue window,
/// blended with the class colour where `labels` has a class, hatched where it says 255 (not computed); within 1
/// per channel (the page computes in double, the previews in f32). Returns how many class voxels it saw.
fn check_slice(b: &Browser, ct: &Array3<f32>, labels: Option<&Array3<f32>>) -> usize {
    let view = View::read(b).unwrap();
    let s = current_slice(b);
    let alpha = PreviewOptions::default().overlay_alpha;
    let mut at = Vec::new();
    let mut expected = Vec::new();
    let mut coloured = 0;
    for r in 0..view.rows {
        for c in 0..view.cols {
            let v = view.voxel(c, r, s);
            let grey = Window::SOFT_TISSUE.grey(ct[v]);
            let id = labels.map_or(0, |l| l[v].round() as u8);
            let (px, py) = view.pixel(c, r);
            expected.push(match id {
                0 => [grey; 3],
                // Not computed: the CT under a diagonal hatch, as in the previews.
                NOT_COMPUTED if ((px + py) as u32).is_multiple_of(HATCH_PERIOD) => HATCH_COLOR,
                NOT_COMPUTED => [grey; 3],
                _ => {
                    coloured += 1;
                    blend(grey, class_color(id), alpha)
                }
            });
            at.push((px, py));
        }
    }
    let got = canvas_pixels(b, &at);
    let wrong: Vec<_> = (0..at.len())
        .filter(|&i| (0..3).any(|k| got[i][k].abs_diff(expected[i][k]) > 1))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} pixels of slice {s} differ; first: pixel {:?} is {:?}, expected {:?}",
        wrong.len(),
        at.len(),
        at[wrong[0]],
        got[wrong[0]],
        expected[wrong[0]]
    );
    coloured
}

/// The class ids of the legend.
fn legend(b: &Browser) -> Vec<u64> {
    b.exec(
        "return Array.from(document.querySelectorAll('#legend [data-class-id]')).map((e) => Number(e.dataset.classId));",
        json!([]),
    )
    .as_array()
    .unwrap()
    .iter()
    .map(|v| v.as_u64().unwrap())
    .collect()
}

/// Selects the class `id` in the class list (a multiple select: a click toggles it).
fn select_class(b: &Browser, id: u8) {
    let option = b.find(&format!("#class-select option[value='{id}']"));
    b.click(&option);
    let chosen = b.exec(
        "return Array.from(document.getElementById('class-select').selectedOptions).map((o) => Number(o.value));",
        json!([]),
    );
    assert_eq!(chosen, json!([id]));
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn the_viewer_page_segments_and_shows_a_ct_in_headless_chromium() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(tool).exists(),
            "{tool} not found: this test drives Debian's headless Chromium; install it with \
             `apt-get install chromium chromium-driver` (scripts/test.sh installs them)"
        );
    }
    let dir = common::scratch("viewer", "run");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(allowed.join("cases")).unwrap();
    let ct_path = allowed.join("cases/ct.nii.gz");
    std::fs::copy(
        common::data("totalsegmentator/example_ct_sm.nii.gz"),
        &ct_path,
    )
    .unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ct_image = read_nifti(&ct_path).unwrap();
    let ct = ct_image.volume.data.clone();
    let orientation = Orientation::from_affine(&ct_image.volume.affine).unwrap();

    let server = Server::start(&dir, &allowed, &token_file);
    // A class the demo weights find something of on this CT (random weights: not every class is present).
    let (class, labels) = [1u8, 3, 5, 2, 6, 10]
        .into_iter()
        .map(|id| {
            (
                id,
                server.label_map(&ct_path, &json!({"classes": [id]}), &dir),
            )
        })
        .find(|(_, l)| l.iter().any(|&v| v > 0.0))
        .expect("the demo weights find none of the tried classes");
    let driver = Driver::start(&dir);
    let browser = Browser::open(&driver, &dir.join("chromium-profile"));

    // 1. The page loads without a token and shows the API's 401 as an error; with the token it lists the CT.
    browser.cmd("POST", "/url", Some(json!({"url": server.url("/")})));
    let (text, state) = wait_for("the page to ask for the token", 30, || {
        let s = browser.status();
        (s.1 == "error").then_some(s)
    });
    assert!(text.contains("token"), "{text} ({state})");
    let token = browser.find("#token");
    browser.send_keys(&token, &format!("{TOKEN}\u{E004}")); // Tab: the field's change event
    let ct_str = ct_path.to_str().unwrap().to_string();
    let option = wait_for("the image list", 60, || {
        let o = browser.exec(
            "return Array.from(document.querySelectorAll('#image-select option')).find((o) => o.value === arguments[0]) || null;",
            json!([ct_str]),
        );
        (!o.is_null()).then_some(o)
    });
    let shown = browser.exec("return arguments[0].textContent;", json!([option]));
    assert_eq!(shown, "cases/ct.nii.gz");

    // 2. Choosing it draws the middle axial slice: the CT in the soft-tissue window, voxel for voxel, in the
    //    previews' orientation and physical aspect.
    browser.click(&option);
    let view = wait_for("the slice to be drawn", 60, || View::read(&browser));
    let dims = ct.dim();
    let dims = [dims.0, dims.1, dims.2];
    assert_eq!(view.col_axis, orientation.voxel_axis[0]);
    assert_eq!(view.row_axis, orientation.voxel_axis[1]);
    assert_eq!(view.slice_axis, orientation.voxel_axis[2]);
    assert_eq!(
        view.flip_col,
        orientation.direction[view.col_axis][0] >= 0.0
    );
    assert_eq!(
        view.flip_row,
        orientation.direction[view.row_axis][1] >= 0.0
    );
    assert_eq!(
        (view.cols, view.rows),
        (dims[view.col_axis], dims[view.row_axis])
    );
    let aspect = (view.cols as f64 * orientation.spacing[view.col_axis])
        / (view.rows as f64 * orientation.spacing[view.row_axis]);
    assert!((view.width / view.height - aspect).abs() < 0.02);
    assert_eq!(current_slice(&browser), dims[view.slice_axis] / 2);
    let canvas_size = browser.exec(
        "const c = document.getElementById('canvas'); const r = c.getBoundingClientRect(); return [c.width, c.height, r.width, r.height];",
        json!([]),
    );
    let size: Vec<f64> = canvas_size
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(
        size,
        [view.width, view.height, view.width, view.height],
        "the canvas is drawn at its own size (no CSS scaling)"
    );
    let greys = canvas_pixels(
        &browser,
        &[(0, 0), (view.width as usize / 2, view.height as usize / 2)],
    );
    assert_ne!(greys[0], greys[1], "the canvas is blank");
    assert_eq!(check_slice(&browser, &ct, None), 0);

    // 3. Choose the class, run: the overlay appears where the API's label map says, the legend lists the class.
    select_class(&browser, class);
    browser.click(&browser.find("#run"));
    browser.wait_run();
    let coloured = check_slice(&browser, &ct, Some(&labels));
    assert!(coloured > 0, "the shown slice has no overlay");
    let present: Vec<u64> = {
        let mut ids: Vec<u64> = labels
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| v as u64)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    assert_eq!(legend(&browser), present);
    // The page jumped to the slice with the most class voxels.
    let per_slice: Vec<usize> = (0..dims[view.slice_axis])
        .map(|s| {
            labels
                .index_axis(ndarray::Axis(view.slice_axis), s)
                .iter()
                .filter(|&&v| v > 0.0 && v < f32::from(NOT_COMPUTED))
                .count()
        })
        .collect();
    let slice = current_slice(&browser);
    assert_eq!(per_slice[slice], *per_slice.iter().max().unwrap());

    // 4. Clicks add points at the clicked voxel (left: positive, right: negative), drawn as markers.
    let rect = browser.exec(
        "const r = document.getElementById('canvas').getBoundingClientRect(); return [r.left, r.top];",
        json!([]),
    );
    let (left, top) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
    let targets = [
        (view.cols / 2, view.rows / 2, 1u8),
        (view.cols / 3, view.rows / 3, 0u8),
    ];
    let mut expected_points = Vec::new();
    for &(c, r, label) in &targets {
        let (px, py) = view.pixel(c, r);
        browser.mouse_click(
            (left + px as f64).round() as i64,
            (top + py as f64).round() as i64,
            if label == 1 { 0 } else { 2 },
        );
        expected_points.push(json!({"voxel": view.voxel(c, r, slice), "label": label}));
    }
    let points = browser.exec("return window.vista3dViewer.points;", json!([]));
    assert_eq!(points, json!(expected_points));
    let items = browser.exec(
        "return Array.from(document.querySelectorAll('#points li')).map((li) => li.textContent);",
        json!([]),
    );
    let v0 = view.voxel(targets[0].0, targets[0].1, slice);
    assert_eq!(
        items[0],
        json!(format!("{}, {}, {} (+)", v0[0], v0[1], v0[2]))
    );
    assert_eq!(items.as_array().unwrap().len(), 2);
    let markers = canvas_pixels(&browser, &targets.map(|(c, r, _)| view.pixel(c, r)));
    assert_eq!(markers, [POSITIVE_POINT, NEGATIVE_POINT]);

    // The screenshot (before the next run changes the picture).
    let png = base64_decode(browser.cmd("GET", "/screenshot", None).as_str().unwrap());
    let shot = image::load_from_memory(&png).unwrap();
    assert!(
        shot.width() >= 1000 && shot.height() >= 700,
        "{}x{}",
        shot.width(),
        shot.height()
    );
    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    std::fs::write(artefacts.join("viewer.png"), &png).unwrap();

    // 5. A run with the points sends them as the NIM's points of the chosen class, with their labels.
    browser.click(&browser.find("#run"));
    browser.wait_run();
    let point_list: Vec<Value> = expected_points.iter().map(|p| p["voxel"].clone()).collect();
    let with_points = server.label_map(
        &ct_path,
        &json!({"classes": [class], "points": {class.to_string(): point_list}, "point_labels": [1, 0]}),
        &dir,
    );
    check_slice(&browser, &ct, Some(&with_points));

    // 6. An upload of the same CT (the file input) gives the same class result as the listed file.
    browser.click(&browser.find("#clear-points"));
    browser.send_keys(&browser.find("#file"), ct_path.to_str().unwrap());
    wait_for("the uploaded image", 60, || {
        let kind = browser.exec(
            "const s = window.vista3dViewer; return s.image && s.source ? s.source.kind : null;",
            json!([]),
        );
        (kind == "upload").then_some(())
    });
    browser.click(&browser.find("#run"));
    browser.wait_run();
    assert!(check_slice(&browser, &ct, Some(&labels)) > 0);
    assert_eq!(legend(&browser), present);
}

/// Standard base64 (the WebDriver screenshot).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let data: Vec<u32> = chunk
            .iter()
            .take_while(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | (v << (18 - 6 * i)));
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
