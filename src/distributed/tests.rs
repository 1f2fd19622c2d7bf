//! A process group of two ranks inside one test process (two threads, each with its own store connection and
//! gloo context on loopback): the collectives, the store exchanges, the configuration check, gradient averaging
//! and a clean finish.

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::ddp::{GradientReducer, LocalStep};
use super::*;

fn env(rank: usize, port: u16) -> LaunchEnv {
    LaunchEnv {
        launcher: Launcher::Torchrun,
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        use_agent_store: false,
        restart_count: 0,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `f(group)` on two ranks at once; returns both results (rank order).
fn on_two_ranks<T: Send + 'static>(
    f: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let settings = DistSettings {
        timeout: Duration::from_secs(60),
        heartbeat_timeout: Duration::from_secs(30),
        ..DistSettings::default()
    };
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (f, settings) = (f.clone(), settings.clone());
            std::thread::spawn(move || {
                let g = ProcessGroup::init(env(rank, port), settings, Device::Cpu)
                    .unwrap_or_else(|e| panic!("rank {rank} could not join: {e}"));
                f(g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
#[cfg(all(vista3d_c10d_store, vista3d_gloo_shim))]
fn collectives_and_exchanges_on_two_ranks() {
    let out = on_two_ranks(|g| {
        let r = g.rank() as f64;
        assert_eq!(g.backend(), Some(Backend::Gloo));
        // Sums, in float32 (larger than gloo's 1 MiB segments) and float64.
        let mut t = Tensor::full([300_000], r + 1.0, (Kind::Float, Device::Cpu));
        g.all_reduce_sum(&mut t).unwrap();
        let sum32 = Vec::<f32>::try_from(&t).unwrap();
        let mut d = Tensor::from_slice(&[0.1f64 * (g.rank() as f64 + 1.0), 1e-300]);
        g.all_reduce_sum(&mut d).unwrap();
        let sum64 = Vec::<f64>::try_from(&d).unwrap();
        // A non-contiguous tensor is staged.
        let base = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) * (r + 1.0);
        let mut view = base.transpose(0, 1);
        g.all_reduce_sum(&mut view).unwrap();
        let transposed = Vec::<f32>::try_from(base.flatten(0, -1)).unwrap();
        // Broadcast from rank 1, and of bytes.
        let mut b = Tensor::full([5], r, (Kind::Float, Device::Cpu));
        g.broadcast(&mut b, 1).unwrap();
        let bcast = Vec::<f32>::try_from(&b).unwrap();
        let blob = g
            .broadcast_blob(
                g.is_main()
                    .then(|| (0..=255u8).cycle().take(70_000).collect()),
            )
            .unwrap();
        g.barrier().unwrap();
        let gathered = g
            .all_gather_bytes(format!("rank{}", g.rank()).as_bytes())
            .unwrap();
        let small = g
            .broadcast_bytes(g.is_main().then_some(&b"from 0"[..]))
            .unwrap();
        g.check_same("answer", "42").unwrap();
        let mismatch = g
            .check_same("width", if g.is_main() { "8" } else { "16" })
            .unwrap_err()
            .to_string();
        g.finish().unwrap();
        (
            sum32, sum64, transposed, bcast, blob, gathered, small, mismatch,
        )
    });
    for (rank, (sum32, sum64, transposed, bcast, blob, gathered, small, mismatch)) in
        out.into_iter().enumerate()
    {
        assert!(sum32.iter().all(|&v| v == 3.0), "rank {rank}");
        assert_eq!(sum64, vec![0.1 + 0.2, 2e-300], "rank {rank}");
        // base = arange * (r + 1) summed over ranks: arange * 3 (the transposed view wrote through).
        assert_eq!(transposed, vec![0.0, 3.0, 6.0, 9.0, 12.0, 15.0]);
        assert_eq!(bcast, vec![1.0; 5]);
        assert_eq!(blob.len(), 70_000);
        assert!(blob.iter().enumerate().all(|(i, &b)| b == (i % 256) as u8));
        assert_eq!(gathered, vec![b"rank0".to_vec(), b"rank1".to_vec()]);
        assert_eq!(small, b"from 0");
        assert!(
            mismatch.contains("disagree on the width: rank 0 has 8, rank 1")
                && mismatch.contains("has 16"),
            "{mismatch}"
        );
    }
}

#[test]
#[cfg(all(vista3d_c10d_store, vista3d_gloo_shim))]
fn gradients_are_averaged_as_ddp_does() {
    let out = on_two_ranks(|g| {
        let r = g.rank() as f64;
        let opts = (Kind::Float, Device::Cpu);
        // a: used on both ranks; b: only on rank 0 (rank 1 must receive rank 0's gradient / 2);
        // c: used nowhere (keeps no gradient).
        let a = Tensor::ones([4], opts).set_requires_grad(true);
        let b = Tensor::ones([3], opts).set_requires_grad(true);
        let c = Tensor::ones([2], opts).set_requires_grad(true);
        let loss = if g.rank() == 0 {
            a.sum(Kind::Float) * 2.0 + b.sum(Kind::Float) * 4.0
        } else {
            a.sum(Kind::Float) * 6.0
        };
        loss.backward();
        let params = vec![
            ("a".to_string(), a.shallow_clone()),
            ("b".to_string(), b.shallow_clone()),
            ("c".to_string(), c.shallow_clone()),
        ];
        // A 4-byte cap: one bucket per parameter.
        let reducer = GradientReducer::new(&params, 4.0 / (1024.0 * 1024.0));
        assert_eq!(reducer.bucket_count(), 3);
        let step = reducer
            .reduce(
                &g,
                LocalStep {
                    loss: Some(1.0 + r),
                    stop: g.rank() == 1,
                },
            )
            .unwrap();
        let b_after = Vec::<f32>::try_from(b.grad()).unwrap();
        // A rank without a prompt contributes nothing; the others are averaged over the contributors.
        let _ = a.grad().zero_();
        if g.rank() == 0 {
            (a.sum(Kind::Float) * 8.0).backward();
        }
        let alone = reducer
            .reduce(
                &g,
                LocalStep {
                    loss: (g.rank() == 0).then_some(5.0),
                    stop: false,
                },
            )
            .unwrap();
        let a_alone = Vec::<f32>::try_from(a.grad()).unwrap();
        // Nobody contributes: nothing happens.
        let none = reducer
            .reduce(
                &g,
                LocalStep {
                    loss: None,
                    stop: false,
                },
            )
            .unwrap();
        g.finish().unwrap();
        (step, b_after, c.grad().defined(), alone, a_alone, none)
    });
    for (rank, (step, b, c_defined, alone, a_alone, none)) in out.into_iter().enumerate() {
        assert_eq!(step.contributors, 2);
        assert_eq!(step.mean_loss, Some(1.5));
        assert!(step.stop, "rank 1 asked to stop: everyone stops");
        assert_eq!(b, vec![2.0; 3], "rank {rank}: b = 4 / 2");
        assert!(
            !c_defined,
            "rank {rank}: an unused parameter keeps no gradient"
        );
        assert_eq!((alone.contributors, alone.mean_loss), (1, Some(5.0)));
        assert_eq!(
            a_alone,
            vec![8.0; 4],
            "rank {rank}: averaged over the one contributor"
        );
        assert_eq!((none.contributors, none.mean_loss), (0, None));
    }
}

#[test]
fn the_configuration_digest_ignores_per_rank_keys_and_key_order() {
    let cfg = |json: &str| {
        let mut c = Config::load(&[], &[]).unwrap();
        c.value = serde_json::from_str(json).unwrap();
        c
    };
    let a = config_digest(&cfg(
        r#"{"epochs": 2, "loss": {"a": 1, "b": 2}, "ckpt_dir": "/x"}"#,
    ));
    let b = config_digest(&cfg(
        r#"{"loss": {"b": 2, "a": 1}, "epochs": 2, "ckpt_dir": "/y", "output_dir": "o", "device": "cuda:1"}"#,
    ));
    assert_eq!(a, b);
    assert_eq!(a.len(), 16);
    let c = config_digest(&cfg(r#"{"epochs": 3, "loss": {"a": 1, "b": 2}}"#));
    assert_ne!(a, c);
}

#[test]
fn settings_from_the_configuration() {
    let cfg = |json: &str| {
        let mut c = Config::load(&[], &[]).unwrap();
        c.value = serde_json::from_str(json).unwrap();
        c
    };
    assert_eq!(
        DistSettings::from_config(&cfg("{}")).unwrap(),
        DistSettings::default()
    );
    let s = DistSettings::from_config(&cfg(
        r#"{"dist_backend": "gloo", "dist_timeout": 30, "dist_heartbeat_timeout": 2.5, "bucket_cap_mb": 1}"#,
    ))
    .unwrap();
    assert_eq!(s.backend, Some(Backend::Gloo));
    assert_eq!(s.timeout, Duration::from_secs(30));
    assert_eq!(s.heartbeat_timeout, Duration::from_millis(2500));
    assert_eq!(s.bucket_cap_mb, 1.0);
    for bad in [
        r#"{"dist_backend": "mpi"}"#,
        r#"{"dist_timeout": 0}"#,
        r#"{"dist_heartbeat_timeout": -1}"#,
        r#"{"bucket_cap_mb": 0}"#,
    ] {
        assert!(DistSettings::from_config(&cfg(bad)).is_err(), "{bad}");
    }
}
