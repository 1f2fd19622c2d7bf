//! `vista3d serve` end to end over real HTTP on loopback (reqwest), with the demo weights (width 16) and small
//! windows on a real CT: served label maps equal `vista3d infer`'s, uploads equal paths, concurrent clients get
//! their own results, a full server answers 503 and recovers, bad requests get 4xx while others succeed, paths
//! and URLs are confined, the token is enforced, a client that leaves frees its place, and SIGTERM lets
//! in-flight requests finish. Every loop is bounded; servers listen on 127.0.0.1 only.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use vista3d::io::read_nifti;

mod common;
use common::data;
use common::{ServeProcess, FAST};

fn tmp(name: &str) -> PathBuf {
    common::scratch("serve", name)
}

/// Servers of different tests would fight over the 2 CPUs: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ct() -> PathBuf {
    data("totalsegmentator/example_ct_sm.nii.gz")
}

/// A test case: the same request as CLI flags and as the NIM's JSON prompts.
struct Case {
    name: &'static str,
    cli: &'static [&'static str],
    prompts: Value,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "class",
            cli: &["--label-prompt", "spleen,liver"],
            prompts: json!({"classes": ["spleen", "liver"]}),
        },
        Case {
            name: "point",
            cli: &[
                "--label-prompt",
                "3",
                "--points",
                "60,50,15",
                "--point-labels",
                "1",
            ],
            prompts: json!({"classes": [3], "points": {"3": [[60, 50, 15]]}}),
        },
        Case {
            name: "everything",
            cli: &[],
            prompts: json!({}),
        },
        Case {
            name: "zero-shot",
            cli: &[
                "--label-prompt",
                "140",
                "--points",
                "60,50,15",
                "--point-labels",
                "1",
            ],
            prompts: json!({"points": {"140": [[60, 50, 15]]}}),
        },
    ]
}

/// `vista3d infer`'s label map bytes for each case (computed once).
fn expected() -> &'static HashMap<&'static str, Vec<u8>> {
    static EXPECTED: OnceLock<HashMap<&'static str, Vec<u8>>> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let out = tmp("expected");
        let ct = ct();
        cases()
            .into_iter()
            .map(|case| {
                let dir = out.join(case.name);
                let mut args = vec![
                    "infer",
                    "--image",
                    ct.to_str().unwrap(),
                    "--output-dir",
                    dir.to_str().unwrap(),
                ];
                args.extend(case.cli);
                args.extend(FAST);
                let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                let bytes =
                    std::fs::read(dir.join("example_ct_sm/example_ct_sm_trans.nii.gz")).unwrap();
                (case.name, bytes)
            })
            .collect()
    })
}

/// A running `vista3d serve` on 127.0.0.1 with the fast test settings (killed when dropped).
struct Server(ServeProcess);

impl std::ops::Deref for Server {
    type Target = ServeProcess;
    fn deref(&self) -> &ServeProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut ServeProcess {
        &mut self.0
    }
}

impl Server {
    fn start(name: &str, extra: &[&str]) -> Server {
        let dir = tmp(&format!("server-{name}"));
        let mut args: Vec<String> = vec!["--spool-dir".into(), dir.to_str().unwrap().into()];
        args.extend(FAST.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let server = Server(ServeProcess::start(&args, dir.join("stderr.log")));
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(r) = c.get(self.url("/v1/health/ready")).send() {
                if r.status() == 200 {
                    let v: Value = r.json().unwrap();
                    assert_eq!(v, json!({"status": "ready"}));
                    return;
                }
                assert_eq!(r.status(), 503, "not ready is 503");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("server not ready after 120 s: {}", self.stderr());
    }

    /// A metric's value (summed over its label sets matching `labels`).
    fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A client that gives up after `ms` milliseconds (and closes its connection).
fn client_with_timeout(ms: u64) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(Duration::from_millis(ms))
        .build()
        .unwrap()
}

fn client() -> Client {
    // The crate builds reqwest with rustls but no default crypto provider: install ring's (as the server does).
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap()
}

/// POSTs a NIM request with the CT by path.
fn post_json(c: &Client, s: &Server, query: &str, body: &Value) -> reqwest::blocking::Response {
    c.post(s.url(&format!("/v1/vista3d/inference{query}")))
        .json(body)
        .send()
        .unwrap()
}

fn path_request(prompts: &Value) -> Value {
    json!({"image": ct().to_str().unwrap(), "prompts": prompts})
}

/// The entries of a zip response.
fn unzip(bytes: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            (f.name().to_string(), v)
        })
        .collect()
}

/// Share of equal voxels of two `.nii.gz` label maps.
fn agreement(a: &[u8], b: &[u8], scratch: &Path) -> f64 {
    let pa = scratch.join(format!("a-{}.nii.gz", std::process::id()));
    let pb = scratch.join(format!("b-{}.nii.gz", std::process::id()));
    std::fs::write(&pa, a).unwrap();
    std::fs::write(&pb, b).unwrap();
    let (va, vb) = (
        read_nifti(&pa).unwrap().volume,
        read_nifti(&pb).unwrap().volume,
    );
    assert_eq!(va.dims(), vb.dims());
    let same = va
        .data
        .iter()
        .zip(vb.data.iter())
        .filter(|(x, y)| x == y)
        .count();
    same as f64 / va.data.len() as f64
}

#[test]
fn served_label_maps_equal_vista3d_infer() {
    let _serial = serial();
    let expected = expected();
    let data_dir = ct().parent().unwrap().to_path_buf();
    let s = Server::start("equal", &["--allow-dir", data_dir.to_str().unwrap()]);
    let c = client();

    // Health, info and license.
    let live: Value = c
        .get(s.url("/v1/health/live"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(live["status"], "live");
    let info: Value = c
        .get(s.url("/v1/vista3d/info"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["model"]["width"], 16);
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["labels"]["3"], "spleen");
    assert_eq!(info["labels"]["1"], "liver");
    assert_eq!(info["everything_labels"].as_array().unwrap().len(), 117);
    assert_eq!(info["precision"]["methods"]["fp32"]["runs_as"], "fp32");
    assert!(c
        .get(s.url("/v1/license"))
        .send()
        .unwrap()
        .text()
        .unwrap()
        .contains("Apache"));

    // Every kind of request, as a bare NIfTI: the very bytes `vista3d infer` wrote.
    for case in cases() {
        let r = post_json(&c, &s, "?format=nifti", &path_request(&case.prompts));
        assert_eq!(r.status(), 200, "{}: {}", case.name, r.text().unwrap());
        assert_eq!(r.headers()["content-type"], "application/gzip");
        let body = r.bytes().unwrap();
        assert!(
            body.as_ref() == expected[case.name].as_slice(),
            "{}: served label map differs from vista3d infer's",
            case.name
        );
    }

    // The NIM's default answer: a zip with the label map and the CLI's JSON record.
    let r = post_json(&c, &s, "", &path_request(&cases()[0].prompts));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let entries = unzip(&r.bytes().unwrap());
    assert_eq!(
        entries["example_ct_sm_trans.nii.gz"], expected["class"],
        "zipped label map"
    );
    let record: Value = serde_json::from_slice(&entries["example_ct_sm_trans.json"]).unwrap();
    assert_eq!(record["label_prompt"], json!([3, 1]));
    // The server's default method is auto: what it runs here (ONNX Runtime on a CPU with its export in the cache).
    let auto = info["precision"]["methods"]["auto"]["runs_as"].clone();
    assert!(auto == "ort" || auto == "fp32", "{auto}");
    assert_eq!(record["precision"]["used"], json!([auto]));
    assert_eq!(record["device"], "cpu");
    assert_eq!(record["request"]["input"]["path"], ct().to_str().unwrap());
    assert!(record["server"]["windows"].as_u64().unwrap() > 0);
    assert_eq!(record["server"]["windows_batched_with_other_requests"], 0);

    // ?preview=true: the zip also holds the QC preview PNG.
    let r = post_json(&c, &s, "?preview=true", &path_request(&cases()[0].prompts));
    assert_eq!(r.status(), 200);
    let entries = unzip(&r.bytes().unwrap());
    assert_eq!(entries["example_ct_sm_trans.nii.gz"], expected["class"]);
    assert_eq!(&entries["example_ct_sm_trans.png"][1..4], b"PNG");

    // The image in the body gives the same bytes: octet-stream with ?request=, and multipart.
    let ct_bytes = std::fs::read(ct()).unwrap();
    let request = serde_json::to_string(&json!({"prompts": cases()[0].prompts})).unwrap();
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("format", "nifti")
        .append_pair("request", &request)
        .finish();
    let r = c
        .post(s.url(&format!("/v1/vista3d/inference?{query}")))
        .header("content-type", "application/octet-stream")
        .body(ct_bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().unwrap().as_ref() == expected["class"].as_slice());
    let form = multipart::Form::new()
        .part(
            "request",
            multipart::Part::text(request.clone())
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "image",
            multipart::Part::bytes(ct_bytes.clone()).file_name("example_ct_sm.nii.gz"),
        );
    let r = c
        .post(s.url("/v1/vista3d/inference"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let entries = unzip(&r.bytes().unwrap());
    assert_eq!(entries["example_ct_sm_trans.nii.gz"], expected["class"]);

    // Per-request output type, as --set output_dtype=uint8 would write.
    let mut body = path_request(&cases()[0].prompts);
    body["output_dtype"] = json!("uint8");
    let r = post_json(&c, &s, "?format=nifti", &body);
    assert_eq!(r.status(), 200);
    let scratch = tmp("equal-scratch");
    std::fs::write(scratch.join("u8.nii.gz"), r.bytes().unwrap()).unwrap();
    let u8_map = read_nifti(&scratch.join("u8.nii.gz")).unwrap();
    assert_eq!(u8_map.header.datatype, 2);
    assert_eq!(
        agreement(
            &std::fs::read(scratch.join("u8.nii.gz")).unwrap(),
            &expected["class"],
            &scratch
        ),
        1.0
    );

    assert!(s.metric("vista3d_requests_total", "status=\"200\"") >= 8.0);
    assert!(s.metric("vista3d_windows_total", "") > 0.0);
    assert!(s.metric("vista3d_stage_seconds_count", "stage=\"inference\"") >= 8.0);
}

#[test]
fn sixteen_clients_four_requests_each_get_their_own_results() {
    let _serial = serial();
    let expected = expected();
    let data_dir = ct().parent().unwrap().to_path_buf();
    // Batching across requests on: windows of clients asking the same classes share network calls.
    let s = Server::start(
        "load",
        &[
            "--allow-dir",
            data_dir.to_str().unwrap(),
            "--workers",
            "4",
            "--queue",
            "64",
            "--set",
            "serve_max_batch_windows=4",
            "--set",
            "serve_batch_wait_ms=20",
        ],
    );
    let all = cases();
    let load: Vec<&Case> = all.iter().filter(|c| c.name != "everything").collect();
    let scratch = tmp("load-scratch");
    let results: Vec<(usize, usize, u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|client_id| {
                let s = &s;
                let load = &load;
                scope.spawn(move || {
                    let c = client();
                    (0..4)
                        .map(|j| {
                            let case = load[(client_id + j) % load.len()];
                            let r = post_json(&c, s, "", &path_request(&case.prompts));
                            let status = r.status().as_u16();
                            (
                                client_id,
                                (client_id + j) % load.len(),
                                status,
                                r.bytes().unwrap().to_vec(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), 64, "no lost responses");
    let mut batched = 0;
    for (client_id, which, status, body) in &results {
        let case = load[*which];
        assert_eq!(*status, 200, "client {client_id} {}", case.name);
        let entries = unzip(body);
        let labels = &entries["example_ct_sm_trans.nii.gz"];
        let record: Value = serde_json::from_slice(&entries["example_ct_sm_trans.json"]).unwrap();
        batched += record["server"]["windows_batched_with_other_requests"]
            .as_u64()
            .unwrap();
        // Batched convolutions round differently from single windows: the project's tolerance (>= 99.99% of
        // voxels) applies; a mixed-up response would agree on far fewer.
        let own = agreement(labels, &expected[case.name], &scratch);
        assert!(own >= 0.9999, "client {client_id} {}: {own}", case.name);
        for other in &load {
            if other.name != case.name {
                let cross = agreement(&expected[other.name], &expected[case.name], &scratch);
                assert!(
                    cross < 0.9999,
                    "{} and {} must differ",
                    other.name,
                    case.name
                );
            }
        }
    }
    assert!(
        batched > 0,
        "some windows ran in batches shared by requests"
    );
    assert!(s.metric("vista3d_batch_windows_count", "") > 0.0);
    assert_eq!(s.metric("vista3d_queue_depth", ""), 0.0);
    assert_eq!(s.metric("vista3d_requests_running", ""), 0.0);
}

/// Fires `n` requests at once and returns their statuses and `Retry-After` headers.
fn burst(s: &Server, n: usize, body: &Value) -> Vec<(u16, Option<String>)> {
    std::thread::scope(|scope| {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                scope.spawn(|| {
                    let r = post_json(&client(), s, "?format=nifti", body);
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    (r.status().as_u16(), retry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_full_server_answers_503_with_retry_after_and_recovers() {
    let _serial = serial();
    let data_dir = ct().parent().unwrap().to_path_buf();
    let s = Server::start(
        "full",
        &[
            "--allow-dir",
            data_dir.to_str().unwrap(),
            "--workers",
            "1",
            "--queue",
            "1",
        ],
    );
    let statuses = burst(&s, 6, &path_request(&json!({})));
    let ok = statuses.iter().filter(|(st, _)| *st == 200).count();
    let full: Vec<_> = statuses.iter().filter(|(st, _)| *st == 503).collect();
    assert_eq!(ok + full.len(), 6, "{statuses:?}");
    assert!(ok >= 1 && !full.is_empty(), "{statuses:?}");
    for (_, retry) in &full {
        let secs: u64 = retry.as_deref().expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&secs));
    }
    // Recovered: the next request is served.
    let r = post_json(
        &client(),
        &s,
        "?format=nifti",
        &path_request(&cases()[0].prompts),
    );
    assert_eq!(r.status(), 200);
    assert!(r.bytes().unwrap().as_ref() == expected()["class"].as_slice());
    assert!(s.metric("vista3d_requests_total", "status=\"503\"") >= 1.0);
}

/// A 4-D NIfTI file (8 x 8 x 8 x 2 float32).
fn four_d_nifti(path: &Path) {
    let mut h = read_nifti(&ct()).unwrap().header;
    h.dim = [4, 8, 8, 8, 2, 1, 1, 1];
    h.datatype = 16;
    h.bitpix = 32;
    h.vox_offset = 352.0;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.extender = [0; 4];
    h.extension_bytes.clear();
    let mut bytes = h.to_bytes().unwrap();
    bytes.extend_from_slice(&[0u8; 4]);
    bytes.extend(std::iter::repeat_n(0u8, 8 * 8 * 8 * 2 * 4));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn malformed_requests_get_4xx_while_a_good_one_succeeds() {
    let _serial = serial();
    let expected = expected();
    let root = tmp("malformed");
    let allowed = root.join("allowed");
    let secret = root.join("secret");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    let ct_bytes = std::fs::read(ct()).unwrap();
    std::fs::write(allowed.join("ct.nii.gz"), &ct_bytes).unwrap();
    std::fs::write(secret.join("ct.nii.gz"), &ct_bytes).unwrap();
    std::os::unix::fs::symlink(secret.join("ct.nii.gz"), allowed.join("escape.nii.gz")).unwrap();
    four_d_nifti(&allowed.join("4d.nii"));
    std::fs::write(
        allowed.join("truncated.nii.gz"),
        &ct_bytes[..ct_bytes.len() / 2],
    )
    .unwrap();
    let s = Server::start(
        "malformed",
        &[
            "--allow-dir",
            allowed.to_str().unwrap(),
            "--max-upload-mb",
            "1",
            "--workers",
            "2",
        ],
    );
    let a = |name: &str| allowed.join(name).to_str().unwrap().to_string();
    let good_body = json!({"image": a("ct.nii.gz"), "prompts": cases()[0].prompts});

    std::thread::scope(|scope| {
        let good = scope.spawn(|| post_json(&client(), &s, "?format=nifti", &good_body));
        let c = client();
        let url = s.url("/v1/vista3d/inference");
        let json_req = |q: &str, v: Value| post_json(&c, &s, q, &v).status().as_u16();
        let raw = |ctype: &str, body: Vec<u8>| {
            c.post(&url)
                .header("content-type", ctype)
                .body(body)
                .send()
                .unwrap()
                .status()
                .as_u16()
        };
        let bad: Vec<(&str, u16, u16)> = vec![
            (
                "not JSON",
                raw("application/json", b"{not json".to_vec()),
                400,
            ),
            (
                "JSON list",
                raw("application/json", b"[1, 2]".to_vec()),
                422,
            ),
            (
                "unknown key",
                json_req("", json!({"imgae": a("ct.nii.gz")})),
                422,
            ),
            ("no image", json_req("", json!({"prompts": {}})), 422),
            (
                "unknown class",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "prompts": {"classes": ["spleeen"]}}),
                ),
                422,
            ),
            (
                "point outside the image",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "prompts": {"points": {"3": [[500, 50, 15]]}}}),
                ),
                422,
            ),
            (
                "zero-shot without points",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "prompts": {"classes": [140]}}),
                ),
                422,
            ),
            (
                "points of two classes",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "prompts": {"points": {"3": [[1, 1, 1]], "1": [[2, 2, 2]]}}}),
                ),
                422,
            ),
            (
                "point labels mismatch",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "prompts": {"points": {"3": [[1, 1, 1]]}, "point_labels": [1, 0]}}),
                ),
                422,
            ),
            (
                "unknown precision",
                json_req("", json!({"image": a("ct.nii.gz"), "precision": "fp8"})),
                422,
            ),
            (
                "local_working_dir",
                json_req(
                    "",
                    json!({"image": a("ct.nii.gz"), "local_working_dir": "/tmp"}),
                ),
                422,
            ),
            (
                "4-D image",
                json_req("", json!({"image": a("4d.nii")})),
                422,
            ),
            (
                "truncated gzip",
                json_req("", json!({"image": a("truncated.nii.gz")})),
                422,
            ),
            (
                "missing file",
                json_req("", json!({"image": a("missing.nii.gz")})),
                422,
            ),
            (
                "relative path",
                json_req("", json!({"image": "ct.nii.gz"})),
                422,
            ),
            (
                "traversal",
                json_req(
                    "",
                    json!({"image": format!("{}/../secret/ct.nii.gz", allowed.display())}),
                ),
                403,
            ),
            (
                "outside the allowed folder",
                json_req(
                    "",
                    json!({"image": secret.join("ct.nii.gz").to_str().unwrap()}),
                ),
                403,
            ),
            (
                "symbolic link escaping",
                json_req("", json!({"image": a("escape.nii.gz")})),
                403,
            ),
            (
                "file:// outside",
                json_req(
                    "",
                    json!({"image": format!("file://{}", secret.join("ct.nii.gz").display())}),
                ),
                403,
            ),
            (
                "URL not allowed",
                json_req("", json!({"image": "http://127.0.0.1:9/ct.nii.gz"})),
                403,
            ),
            (
                "cloud metadata URL",
                json_req(
                    "",
                    json!({"image": "http://169.254.169.254/latest/meta-data"}),
                ),
                403,
            ),
            (
                "random bytes",
                raw("application/octet-stream", vec![7u8; 5000]),
                422,
            ),
            (
                "empty upload",
                raw("application/octet-stream", Vec::new()),
                422,
            ),
            (
                "upload over the limit",
                raw("application/octet-stream", vec![0u8; 1_500_000]),
                413,
            ),
            ("text/plain", raw("text/plain", b"hello".to_vec()), 415),
            (
                "dicom-seg of a NIfTI image",
                json_req("?format=dicom-seg", good_body.clone()),
                422,
            ),
            (
                "preview without a zip",
                json_req("?preview=true&format=nifti", good_body.clone()),
                400,
            ),
            (
                "unknown query parameter",
                json_req("?fromat=zip", good_body.clone()),
                400,
            ),
            (
                "multipart without image",
                c.post(&url)
                    .multipart(multipart::Form::new().text("request", "{}"))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16(),
                422,
            ),
            (
                "multipart unknown part",
                c.post(&url)
                    .multipart(multipart::Form::new().text("file", "x"))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16(),
                400,
            ),
            (
                "unknown route",
                c.get(s.url("/v1/vista3d/nothing"))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16(),
                404,
            ),
        ];
        assert!(bad.len() >= 20);
        for (what, got, want) in &bad {
            assert_eq!(got, want, "{what}");
        }
        let r = good.join().unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().unwrap().as_ref() == expected["class"].as_slice());
    });
    // The messages are the CLI's, and the server still serves.
    let r = post_json(
        &client(),
        &s,
        "",
        &json!({"image": a("ct.nii.gz"), "prompts": {"classes": ["spleeen"]}}),
    );
    let e: Value = r.json().unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown class name 'spleeen'"),
        "{e}"
    );
    assert!(
        e["error"].as_str().unwrap().contains("spleen"),
        "suggestion: {e}"
    );
    let r = post_json(&client(), &s, "", &json!({"image": a("4d.nii")}));
    let e: Value = r.json().unwrap();
    assert_eq!(e["status"], 422);
    assert!(e["error"].as_str().unwrap().contains("4d.nii"), "{e}");
    let r = post_json(&client(), &s, "?format=nifti", &good_body);
    assert_eq!(r.status(), 200);
    assert_eq!(s.metric("vista3d_requests_running", ""), 0.0);
}

#[test]
fn the_token_protects_everything_but_health() {
    let _serial = serial();
    let dir = tmp("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let data_dir = ct().parent().unwrap().to_path_buf();
    let s = Server::start(
        "token",
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--allow-dir",
            data_dir.to_str().unwrap(),
        ],
    );
    let c = client();
    let get = |path: &str, token: Option<&str>| {
        let mut r = c.get(s.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(get("/v1/health/live", None), 200);
    assert_eq!(get("/v1/health/ready", None), 200);
    assert_eq!(get("/v1/vista3d/info", None), 401);
    assert_eq!(get("/v1/vista3d/info", Some("wrong")), 401);
    assert_eq!(get("/v1/vista3d/info", Some("s3cret-token")), 200);
    assert_eq!(get("/metrics", None), 401);
    assert_eq!(get("/metrics", Some("s3cret-token")), 200);
    let body = path_request(&cases()[0].prompts);
    let r = c
        .post(s.url("/v1/vista3d/inference?format=nifti"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = c
        .post(s.url("/v1/vista3d/inference?format=nifti"))
        .bearer_auth("s3cret-token")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(s);

    let s = Server::start(
        "token-metrics-public",
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--metrics-public",
        ],
    );
    let c = client();
    assert_eq!(c.get(s.url("/metrics")).send().unwrap().status(), 200);
    assert_eq!(
        c.get(s.url("/v1/vista3d/info")).send().unwrap().status(),
        401
    );
}

/// A tiny loopback HTTP server for the URL tests: `/ok/ct.nii.gz` and `/secret/ct.nii.gz` serve the CT,
/// `/ok/in` redirects to `/ok/ct.nii.gz`, `/ok/out` to `/secret/ct.nii.gz`; anything else is 404. Stops when
/// `stop` is set, and after 300 s in any case.
fn file_server(ct_bytes: Vec<u8>, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (head, body): (String, &[u8]) = match path {
                "/ok/ct.nii.gz" | "/secret/ct.nii.gz" => (
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", ct_bytes.len()),
                    &ct_bytes,
                ),
                "/ok/in" => (
                    "HTTP/1.1 302 Found\r\nLocation: /ok/ct.nii.gz\r\nContent-Length: 0\r\n".into(),
                    b"",
                ),
                "/ok/out" => (
                    "HTTP/1.1 302 Found\r\nLocation: /secret/ct.nii.gz\r\nContent-Length: 0\r\n"
                        .into(),
                    b"",
                ),
                _ => (
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n".into(),
                    b"",
                ),
            };
            let _ = conn.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
            let _ = conn.write_all(body);
        }
    });
    (port, handle)
}

#[test]
fn urls_only_under_allowed_prefixes_and_redirects_checked() {
    let _serial = serial();
    let expected = expected();
    let stop = Arc::new(AtomicBool::new(false));
    let (port, files) = file_server(std::fs::read(ct()).unwrap(), stop.clone());
    let prefix = format!("http://127.0.0.1:{port}/ok/");
    let s = Server::start("urls", &["--allow-url-prefix", &prefix]);
    let c = client();
    let ask = |path: &str| {
        post_json(
            &c,
            &s,
            "?format=nifti",
            &json!({"image": format!("http://127.0.0.1:{port}{path}"), "prompts": cases()[0].prompts}),
        )
    };
    let r = ask("/ok/ct.nii.gz");
    assert_eq!(r.status(), 200);
    assert!(r.bytes().unwrap().as_ref() == expected["class"].as_slice());
    let r = ask("/ok/in");
    assert_eq!(r.status(), 200, "a redirect inside the prefix is followed");
    assert_eq!(
        ask("/ok/out").status(),
        403,
        "a redirect out of the prefix is refused"
    );
    assert_eq!(ask("/secret/ct.nii.gz").status(), 403);
    assert_eq!(ask("/ok/../secret/ct.nii.gz").status(), 403);
    assert_eq!(ask("/ok/missing.nii.gz").status(), 502);
    // No paths on this server: it has no --allow-dir.
    assert_eq!(
        post_json(&c, &s, "", &path_request(&json!({}))).status(),
        403
    );
    stop.store(true, Ordering::SeqCst);
    files.join().unwrap();
}

#[test]
fn a_client_that_leaves_frees_its_place() {
    let _serial = serial();
    let data_dir = ct().parent().unwrap().to_path_buf();
    let s = Server::start(
        "leave",
        &[
            "--allow-dir",
            data_dir.to_str().unwrap(),
            "--workers",
            "1",
            "--queue",
            "1",
        ],
    );
    let everything = path_request(&json!({}));
    std::thread::scope(|scope| {
        // A runs; B waits in the queue, then its client gives up.
        let a = scope.spawn(|| post_json(&client(), &s, "?format=nifti", &everything).status());
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.metric("vista3d_requests_running", "") < 1.0 {
            assert!(Instant::now() < deadline, "A never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        let impatient = client_with_timeout(500);
        let b = impatient
            .post(s.url("/v1/vista3d/inference"))
            .json(&everything)
            .send();
        assert!(b.is_err(), "B's client gave up");
        // B's place is free again although A still runs: C is admitted (not 503) and served.
        let c = post_json(
            &client(),
            &s,
            "?format=nifti",
            &path_request(&cases()[0].prompts),
        );
        assert_eq!(c.status(), 200);
        assert_eq!(a.join().unwrap(), 200);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric("vista3d_requests_total", "status=\"cancelled\"") < 1.0 {
        assert!(Instant::now() < deadline, "B was not counted as cancelled");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A running request whose client leaves stops at its next window and frees the request thread.
    let impatient = client_with_timeout(800);
    assert!(impatient
        .post(s.url("/v1/vista3d/inference"))
        .json(&everything)
        .send()
        .is_err());
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.metric("vista3d_requests_running", "") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned request kept running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = post_json(
        &client(),
        &s,
        "?format=nifti",
        &path_request(&cases()[0].prompts),
    );
    assert_eq!(r.status(), 200);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let _serial = serial();
    let expected = expected();
    let data_dir = ct().parent().unwrap().to_path_buf();
    let mut s = Server::start(
        "sigterm",
        &[
            "--allow-dir",
            data_dir.to_str().unwrap(),
            "--workers",
            "2",
            "--queue",
            "8",
        ],
    );
    let body = path_request(&cases()[0].prompts);
    std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| post_json(&client(), &s, "?format=nifti", &body)))
            .collect();
        // Wait until all six are admitted (running or queued), then SIGTERM.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let admitted =
                s.metric("vista3d_requests_running", "") + s.metric("vista3d_queue_depth", "");
            if admitted >= 6.0 {
                break;
            }
            assert!(Instant::now() < deadline, "requests were not admitted");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: sends SIGTERM to the server this test started, by its process id.
        let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        for h in hs {
            let r = h.join().unwrap();
            assert_eq!(r.status(), 200, "an in-flight request finishes");
            assert!(r.bytes().unwrap().as_ref() == expected["class"].as_slice());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "exit status {status:?}: {}", s.stderr());
    assert!(s.stderr().contains("shutting down"));
    assert!(
        client().get(s.url("/v1/health/live")).send().is_err(),
        "no longer listening"
    );
}

/// The DICOM series of TotalSegmentator's example CT (JPEG 2000), fetched by scripts/fetch_data.sh.
fn series_dir() -> PathBuf {
    data("totalsegmentator/example_ct.nii.gz")
        .parent()
        .unwrap()
        .join("example_ct_dicom")
}

/// A zip of the files of `dir` (flat).
fn zip_of(dir: &Path) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        z.start_file(
            format!("series/{}", p.file_name().unwrap().to_string_lossy()),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        z.write_all(&std::fs::read(&p).unwrap()).unwrap();
    }
    z.finish().unwrap().into_inner()
}

#[test]
fn dicom_series_in_dicom_seg_out() {
    let _serial = serial();
    let series = series_dir();
    let work = tmp("dicom");
    // What `vista3d infer` writes for the series ("everything": some class is always found).
    let out = work.join("cli");
    let mut args = vec![
        "infer",
        "--image",
        series.to_str().unwrap(),
        "--output-format",
        "both",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    args.extend(FAST);
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli_nii =
        std::fs::read(out.join("example_ct_dicom/example_ct_dicom_trans.nii.gz")).unwrap();
    let cli_seg = std::fs::read(out.join("example_ct_dicom/example_ct_dicom_trans.dcm")).unwrap();

    let s = Server::start(
        "dicom",
        &[
            "--allow-dir",
            series.parent().unwrap().to_str().unwrap(),
            "--allow-dir",
            work.to_str().unwrap(),
            "--max-upload-mb",
            "64",
        ],
    );
    let c = client();
    let by_path = json!({"image": series.to_str().unwrap()});
    let is_seg = |b: &[u8]| {
        b.len() > 132
            && &b[128..132] == b"DICM"
            && b.windows(28).any(|w| w == b"1.2.840.10008.5.1.4.1.1.66.4")
    };

    // A series folder by path: the label map equals the CLI's, the SEG is a Segmentation object.
    let r = post_json(&c, &s, "?format=nifti", &by_path);
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert!(r.bytes().unwrap().as_ref() == cli_nii.as_slice());
    let r = post_json(&c, &s, "?format=dicom-seg", &by_path);
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert_eq!(r.headers()["content-type"], "application/dicom");
    let seg = r.bytes().unwrap();
    assert!(is_seg(&seg), "not a DICOM SEG ({} bytes)", seg.len());
    // Same segments and frames as the CLI's SEG; only UIDs and dates differ, so the sizes agree closely.
    let (a, b) = (seg.len() as f64, cli_seg.len() as f64);
    assert!(
        (a - b).abs() / b < 0.01,
        "served SEG {a} bytes, CLI SEG {b}"
    );

    // The series uploaded as a zip: the same label map and a SEG.
    let body = zip_of(&series);
    for (format, check_seg) in [("nifti", false), ("dicom-seg", true)] {
        let r = c
            .post(s.url(&format!("/v1/vista3d/inference?format={format}")))
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{format}: {}", r.text().unwrap());
        let bytes = r.bytes().unwrap();
        if check_seg {
            assert!(is_seg(&bytes));
        } else {
            assert!(bytes.as_ref() == cli_nii.as_slice(), "uploaded series");
        }
    }

    // A zip that holds no series: 422 naming the problem; the server goes on.
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    z.start_file("notes.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    z.write_all(b"no images here").unwrap();
    let r = c
        .post(s.url("/v1/vista3d/inference?format=dicom-seg"))
        .header("content-type", "application/octet-stream")
        .body(z.finish().unwrap().into_inner())
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().unwrap();
    assert!(e["error"].as_str().unwrap().contains("DICOM"), "{e}");

    // A symbolic link inside a series folder that leaves the allowed folder: 403.
    let linked = work.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink("/etc", linked.join("escape")).unwrap();
    let r = post_json(
        &c,
        &s,
        "?format=dicom-seg",
        &json!({"image": linked.to_str().unwrap()}),
    );
    assert_eq!(r.status(), 403, "{}", r.text().unwrap());
    let r = post_json(&c, &s, "?format=nifti", &by_path);
    assert_eq!(r.status(), 200);
}
