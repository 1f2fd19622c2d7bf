//! `deploy/`: the container build file and the Kubernetes manifests parse, hold what an operator needs (probes on
//! the health endpoints, one GPU per pod, the server's port), and the server's command line in them is accepted by
//! `vista3d serve --check` (which checks everything but loads no weights). They cannot run here (no Docker, no
//! cluster).

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn docs() -> Vec<Yaml> {
    let text = std::fs::read_to_string(repo("deploy/kubernetes.yaml")).unwrap();
    YamlLoader::load_from_str(&text).expect("deploy/kubernetes.yaml is valid YAML")
}

fn kind<'a>(docs: &'a [Yaml], k: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(k))
        .unwrap_or_else(|| panic!("no {k} in deploy/kubernetes.yaml"))
}

#[test]
fn kubernetes_deployment_and_service() {
    let docs = docs();
    let deployment = kind(&docs, "Deployment");
    assert_eq!(deployment["apiVersion"].as_str(), Some("apps/v1"));
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    let containers = pod["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    // Probes on the health endpoints, by the named port.
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/v1/health/ready")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/v1/health/live")
    );
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("http"),
            "{probe}"
        );
    }
    let port = &c["ports"][0];
    assert_eq!(port["name"].as_str(), Some("http"));
    assert_eq!(port["containerPort"].as_i64(), Some(8000));
    // One GPU per pod.
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_i64(), Some(1));
    // The grace period outlasts the request timeout, so SIGTERM lets requests finish.
    let args: Vec<String> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_string())
        .collect();
    let timeout: f64 = args[args.iter().position(|a| a == "--timeout").unwrap() + 1]
        .parse()
        .unwrap();
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() as f64 > timeout);
    // Every mounted volume exists.
    let volumes: Vec<&str> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for m in c["volumeMounts"].as_vec().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()), "{m:?}");
    }
    // The Service selects the pods and reaches the named port.
    let service = kind(&docs, "Service");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    assert_eq!(service["spec"]["ports"][0]["port"].as_i64(), Some(8000));
}

#[test]
fn the_deployed_command_line_is_accepted() {
    let docs = docs();
    let c = &kind(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    // The pod's mounts exist only in the cluster: point them at local stand-ins, keep every flag.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve_deploy");
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["data", "models", "spool", "etc"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("models/model.pt"), b"not read by --check").unwrap();
    std::fs::write(dir.join("etc/token"), "t0ken\n").unwrap();
    let local = |a: &str| -> String {
        match a {
            "/data" => dir.join("data").display().to_string(),
            "/models/model.pt" => dir.join("models/model.pt").display().to_string(),
            "/spool" => dir.join("spool").display().to_string(),
            "/etc/vista3d/token" => dir.join("etc/token").display().to_string(),
            // No GPU here: the device flag is checked with the CPU.
            "cuda:0" => "cpu".into(),
            other => other.to_string(),
        }
    };
    let args: Vec<String> = args.iter().map(|a| local(a)).collect();
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .arg("serve")
        .args(&args)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "vista3d serve {args:?} --check: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let settings: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(settings["listen"], "0.0.0.0:8000");
    assert_eq!(settings["token"], true);
    assert_eq!(settings["workers"], 4);
    // A mistyped flag would have been refused.
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(["serve", "--workers", "0", "--demo-weights", "--check"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

/// The Dockerfile's instructions: (keyword, arguments), continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (k, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((k.to_ascii_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continued line"
    );
    out
}

#[test]
fn dockerfile_builds_and_runs_the_server() {
    let known = [
        "FROM",
        "RUN",
        "COPY",
        "ENV",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "ARG",
        "LABEL",
    ];
    let ins = dockerfile();
    for (k, _) in &ins {
        assert!(known.contains(&k.as_str()), "unknown instruction {k}");
    }
    let froms: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    assert!(froms[0].ends_with("AS build"));
    // The build stage's Rust is at least the crate's rust-version.
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let image_rust = froms[0]
        .strip_prefix("rust:")
        .and_then(|r| r.split('-').next())
        .unwrap();
    let v = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        v(image_rust) >= v(&msrv),
        "rust:{image_rust} < rust-version {msrv}"
    );
    // Exec-form entry point and command (JSON arrays): `vista3d serve` on the exposed port.
    let json = |k: &str| -> Vec<String> {
        let (_, a) = ins.iter().find(|(key, _)| key == k).unwrap();
        serde_json::from_str(a).unwrap_or_else(|e| panic!("{k} is not exec form: {e}"))
    };
    assert_eq!(json("ENTRYPOINT"), ["/opt/vista3d/vista3d", "serve"]);
    let cmd = json("CMD");
    assert_eq!(cmd[..2], ["--listen", "0.0.0.0:8000"]);
    let expose: Vec<&String> = ins
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(expose, ["8000"]);
    // The runtime stage copies what the build stage made; the build copies the repository (with a dockerignore
    // next to the Dockerfile keeping target/ and .venv/ out).
    assert!(ins
        .iter()
        .any(|(k, a)| k == "COPY" && a.starts_with("--from=build /opt/vista3d")));
    let ignore = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
    // The build uses the project's own environment script and a locked build.
    assert!(repo("scripts/env.sh").is_file());
    assert!(ins
        .iter()
        .any(|(k, a)| k == "RUN" && a.contains(". scripts/env.sh") && a.contains("--locked")));
    // The image runs as the non-root user the Deployment expects.
    let docs = docs();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let uid = pod["securityContext"]["runAsUser"].as_i64().unwrap();
    assert!(ins
        .iter()
        .any(|(k, a)| k == "USER" && a == &uid.to_string()));
}
