//! `deploy/k8s/batch-job.yaml` (Kubernetes Indexed Job) and `deploy/slurm/batch.sbatch` (Slurm array): they parse,
//! hold what the issue asks (indexed completions matching `--shards`, one GPU per pod or task, one shared volume for
//! inputs and outputs), and every `vista3d batch` flag in them exists. They cannot run here (no cluster).

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The long flags of `vista3d batch --help`.
fn batch_flags() -> Vec<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_vista3d"))
        .args(["batch", "--help"])
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches([',', '.'])
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn assert_known_flags(args: &[String], what: &str) {
    let known = batch_flags();
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(known.contains(a), "{what}: `vista3d batch` has no flag {a}");
    }
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn kubernetes_indexed_job() {
    let text = std::fs::read_to_string(repo("deploy/k8s/batch-job.yaml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("valid YAML");
    assert_eq!(docs.len(), 1);
    let job = &docs[0];
    assert_eq!(job["apiVersion"].as_str(), Some("batch/v1"));
    assert_eq!(job["kind"].as_str(), Some("Job"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let completions = spec["completions"].as_i64().unwrap();
    assert!(completions > 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"].as_str(), Some("Never"));
    let c = &pod["containers"][0];
    let command: Vec<String> = c["command"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|y| y.as_str().unwrap().to_string())
        .collect();
    assert!(
        command[0].ends_with("vista3d") && command[1] == "batch",
        "{command:?}"
    );
    let args: Vec<String> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|y| match y {
            Yaml::String(s) => s.clone(),
            other => panic!("args must be strings, got {other:?}"),
        })
        .collect();
    assert_known_flags(&args, "batch-job.yaml");
    // The shard index comes from JOB_COMPLETION_INDEX; the shard count must be the Job's completions.
    assert_eq!(
        flag_value(&args, "--shards"),
        Some(completions.to_string().as_str())
    );
    assert!(flag_value(&args, "--shard").is_none());
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"].as_i64(), Some(1));
    // Inputs and outputs on a mounted volume shared by the pods.
    let input = flag_value(&args, "--input-dir").unwrap();
    let output = flag_value(&args, "--output-dir").unwrap();
    let mounts = c["volumeMounts"].as_vec().unwrap();
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{path} is on no volume"))
    };
    let (m_in, m_out) = (mount_of(input), mount_of(output));
    assert_eq!(m_in["name"], m_out["name"]);
    assert!(m_out["readOnly"].as_bool() != Some(true));
    let volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m_out["name"])
        .unwrap();
    assert!(volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .is_some());
    let checkpoint = flag_value(&args, "--checkpoint").unwrap();
    mount_of(checkpoint);
}

#[test]
fn slurm_array_job() {
    let path = repo("deploy/slurm/batch.sbatch");
    let text = std::fs::read_to_string(&path).unwrap();
    let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sbatch: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .collect();
    let array = sbatch
        .iter()
        .find_map(|l| l.strip_prefix("--array="))
        .expect("an array job");
    let (lo, hi) = array.split_once('-').unwrap();
    assert!(hi.parse::<u32>().unwrap() > lo.parse::<u32>().unwrap());
    assert!(sbatch.contains(&"--gpus-per-task=1"), "{sbatch:?}");
    // The command: `vista3d batch` with flags that exist, shards from the array's environment (no --shard).
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .find(|l| !l.trim_start().starts_with('#') && l.contains("vista3d batch"))
        .expect("runs vista3d batch");
    let args: Vec<String> = line
        .split_whitespace()
        .skip_while(|w| *w != "batch")
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_known_flags(&args, "batch.sbatch");
    assert!(flag_value(&args, "--shard").is_none() && flag_value(&args, "--shards").is_none());
    assert!(
        flag_value(&args, "--output-dir").is_some() && flag_value(&args, "--input-dir").is_some()
    );
}
