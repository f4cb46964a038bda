//! The import benchmark (scripts/import-bench.sh): MB/s of importing a large archive into a
//! real node, to disk (every blob fsynced, as always). Prints numbers, asserts only that the
//! imports happened. Runs only with `PIER_IMPORT_BENCH=1`; otherwise it says it skipped.
//!
//! `PIER_IMPORT_BENCH_MIB` (archive size, default 1024), `PIER_IMPORT_BENCH_OUT` (a file the
//! result lines are appended to).
//!
//! Measured, each into the same node, after a reference write of as many bytes to the same
//! filesystem (the machine's disk sets the ceiling): a `docker save` tarball through `pier import` (file to
//! node over loopback HTTP, end to end as the CLI sees it); the same archive zstd-compressed,
//! of different content, through the watched folder (from the rename into the folder until it
//! is in `done/`, which includes the folder's `stable_seconds` wait of 1 s, reported apart);
//! and a renamed copy of the first, recognised as a duplicate.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{one_image, pier_cli, wait_for_file, write_docker_save, LayerSpec, Pier, MIB};

/// The layers of an archive of about `total` bytes: one half, one quarter, the rest in two.
fn layers(total: u64, seed: u64) -> Vec<LayerSpec> {
    let half = total / 2;
    let quarter = total / 4;
    let rest = total - half - quarter;
    vec![
        LayerSpec::new("usr/lib/big.bin", half, seed),
        LayerSpec::new("usr/share/data.bin", quarter, seed + 1),
        LayerSpec::new("opt/app/a.bin", rest / 2, seed + 2),
        LayerSpec::new("opt/app/b.bin", rest - rest / 2, seed + 3),
    ]
}

fn archive(dir: &Path, total: u64, seed: u64, tag: &str) -> std::path::PathBuf {
    let layout = one_image(
        &dir.join(format!("layout-{seed}")),
        "v1",
        layers(total, seed),
    );
    let image = layout.image("v1").clone();
    let out = dir.join(format!("bench-{seed}.tar"));
    write_docker_save(&layout, &image, &[tag], &out);
    // The layout is no longer needed; its disk space is.
    std::fs::remove_dir_all(&layout.dir).expect("remove the layout");
    out
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_bench() {
    if std::env::var("PIER_IMPORT_BENCH").as_deref() != Ok("1") {
        eprintln!(
            "skipped: the import benchmark runs with PIER_IMPORT_BENCH=1 (scripts/import-bench.sh)"
        );
        return;
    }
    let mib: u64 = std::env::var("PIER_IMPORT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let tmp = tempfile::tempdir().expect("tempdir");
    let watch = tmp.path().join("incoming");
    std::fs::create_dir_all(&watch).expect("create the folder");
    let plain = archive(tmp.path(), mib * MIB, 101, "bench/app:v1");
    let second = archive(tmp.path(), mib * MIB, 201, "bench/web:v1");
    let zst = tmp.path().join("bench-web.tar.zst");
    let zstd_ok = std::process::Command::new("zstd")
        .args(["-q", "-1", "-T0", "-f", "-o"])
        .arg(&zst)
        .arg(&second)
        .status()
        .is_ok_and(|s| s.success());
    let dir = tmp.path().join("pier");
    let pier = Pier::with_config(
        &dir,
        &format!(
            "[mirror]\ndefault_upstream = \"\"\nbuiltin_upstreams = false\n\
             [storage]\nmin_free_space = 0\n\
             [import]\nwatch = {:?}\nstable_seconds = 1\nrescan_seconds = 1\n",
            watch.display().to_string()
        ),
        &[],
    );
    // The node's CPU seconds (user + system) per GiB of tar imported: what each byte costs it.
    let cpu = pier_bench::cpu::ServerCpu::new(&[pier.pid()])
        .expect("read the node's /proc")
        .expect("one pid");
    let cpu_per_gib = |before: f64, bytes: u64| {
        pier_bench::cpu::per_gib(cpu.seconds() - before, bytes).unwrap_or(0.0)
    };
    let mut lines = Vec::new();
    let mut say = |line: String| {
        println!("{line}");
        lines.push(line);
    };

    let size = std::fs::metadata(&plain).expect("stat").len();
    // The disk's own pace on the node's filesystem, measured just before: the same number of
    // bytes written in 1 MiB pieces and fsynced, as a plain copy would.
    let reference = dir.join("reference.bin");
    let started = Instant::now();
    {
        let mut f = std::fs::File::create(&reference).expect("create the reference file");
        let piece = vec![0x5au8; MIB as usize];
        for _ in 0..size.div_ceil(MIB) {
            f.write_all(&piece).expect("write the reference file");
        }
        f.sync_all().expect("sync the reference file");
    }
    let disk = started.elapsed();
    std::fs::remove_file(&reference).expect("remove the reference file");
    say(format!(
        "disk reference: {:.0} MiB written and fsynced in {:.2} s = {:.0} MB/s",
        size as f64 / MIB as f64,
        disk.as_secs_f64(),
        mbps(size, disk)
    ));

    let cpu_before = cpu.seconds();
    let started = Instant::now();
    let out = pier_cli(&[
        "import",
        "--url",
        &pier.url(),
        "--json",
        &plain.display().to_string(),
    ]);
    let took = started.elapsed();
    let plain_cpu = cpu_per_gib(cpu_before, size);
    assert!(
        out.status.success(),
        "pier import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["result"], "imported");
    let node_s = report["seconds"].as_f64().unwrap_or(0.0);
    say(format!(
        "pier import, docker save {:.0} MiB, uncompressed: {:.2} s end to end = {:.0} MB/s \
         (node: {node_s:.2} s = {:.0} MB/s); node CPU {plain_cpu:.2} s/GiB",
        size as f64 / MIB as f64,
        took.as_secs_f64(),
        mbps(size, took),
        mbps(size, Duration::from_secs_f64(node_s.max(1e-6)))
    ));

    // The image back out as an archive: `pier export` through the node's export API, the
    // archive fsynced by the CLI. The node's CPU per GiB of archive written.
    let exported = tmp.path().join("exported.tar");
    let cpu_before = cpu.seconds();
    let started = Instant::now();
    let out = pier_cli(&[
        "export",
        "--url",
        &pier.url(),
        "-o",
        &exported.display().to_string(),
        "bench/app:v1",
    ]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "pier export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let esize = std::fs::metadata(&exported).expect("stat the export").len();
    let export_cpu = cpu_per_gib(cpu_before, esize);
    say(format!(
        "pier export of the same image ({:.0} MiB archive): {:.2} s end to end = {:.0} MB/s; \
         node CPU {export_cpu:.2} s/GiB",
        esize as f64 / MIB as f64,
        took.as_secs_f64(),
        mbps(esize, took)
    ));
    std::fs::remove_file(&exported).expect("remove the export");

    if zstd_ok {
        let zsize = std::fs::metadata(&zst).expect("stat").len();
        let staged = watch.join(".bench-web.tar.zst");
        std::fs::rename(&zst, &staged).expect("stage in the folder");
        let cpu_before = cpu.seconds();
        let started = Instant::now();
        std::fs::rename(&staged, watch.join("web.tar.zst")).expect("rename into the folder");
        assert!(
            wait_for_file(&watch.join("done/web.tar.zst"), Duration::from_secs(600)).await,
            "not imported:\n{}",
            pier.log()
        );
        let took = started.elapsed();
        let zstd_cpu = cpu_per_gib(cpu_before, size);
        let work = took.saturating_sub(Duration::from_secs(1));
        say(format!(
            "watched folder, docker save zstd ({:.0} MiB compressed, {:.0} MiB of tar): {:.2} s \
             from rename to done/ = {:.0} MB/s of tar; less the 1 s stability wait: {:.0} MB/s; \
             node CPU {zstd_cpu:.2} s/GiB of tar",
            zsize as f64 / MIB as f64,
            size as f64 / MIB as f64,
            took.as_secs_f64(),
            mbps(size, took),
            mbps(size, work)
        ));
    } else {
        say("watched folder, zstd: skipped (no zstd command to compress the archive)".into());
    }

    let copy = tmp.path().join("renamed.tar");
    std::fs::rename(&plain, &copy).expect("rename");
    let started = Instant::now();
    let out = pier_cli(&[
        "import",
        "--url",
        &pier.url(),
        "--json",
        &copy.display().to_string(),
    ]);
    let took = started.elapsed();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["result"], "duplicate");
    say(format!(
        "pier import of a renamed copy (duplicate): {:.2} s = {:.0} MB/s",
        took.as_secs_f64(),
        mbps(size, took)
    ));

    if let Ok(path) = std::env::var("PIER_IMPORT_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open the results file");
        for l in &lines {
            writeln!(f, "{l}").expect("write the results");
        }
    }
}
