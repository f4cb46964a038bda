//! The tier's machinery, checked with what pier does without cluster flags: namespaces are made
//! and removed (stale ones of dead test runs too), the upstream is reachable from node
//! namespaces, a pier inside one namespace is pulled from by skopeo and containerd inside
//! another, and each fault does what the scenarios rely on: a partition cuts a node off in both
//! directions until healed, a hang keeps connections open but unanswered, a kill refuses them,
//! and a restarted node serves what it stored.

use std::net::SocketAddr;
use std::time::Instant;

use crate::common::clients::{oci_ref, Containerd, Skopeo};
use crate::common::{
    assert_same_blobs, http_status_at, write_layout, Entry, ImageSpec, LayerSpec, KIB, MIB,
};
use crate::net::run;
use crate::nodes::{hosts_dir, pull_image, Cluster, Membership, UpstreamCounts, UPSTREAM};
use crate::serial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_network_processes_and_faults() {
    let Some(_one) = serial("harness_network_processes_and_faults").await else {
        return;
    };
    let t0 = Instant::now();

    // A namespace named for a test process that is gone is removed by the next network.
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("reap true");
    let stale = format!("pc{dead_pid}x0-n1");
    run(&["ip", "netns", "add", &stale]);

    let mut c = Cluster::new(2);
    let listed = run(&["ip", "netns", "list"]);
    assert!(
        !listed.contains(&stale),
        "the stale namespace {stale} survived:\n{listed}"
    );
    let namespaces = c.net.namespaces();

    let layout = write_layout(
        &c.tmp.path().join("src"),
        vec![(
            "v1",
            Entry::Image(ImageSpec::linux(
                "amd64",
                vec![
                    LayerSpec::new("etc/app.conf", 3 * KIB + 5, 901),
                    LayerSpec::new("bin/app", 3 * MIB + 11, 902),
                    LayerSpec::new("data/blob", MIB, 903),
                ],
            )),
        )],
    );
    let image = layout.image("v1").clone();
    c.upstream
        .push(&c.http, "team/app", "v1", &layout, &image)
        .await;

    // The upstream answers inside the node namespaces.
    let n2_ns = c.net.host("n2").ns.clone();
    let skopeo_dir = c.tmp.path().join("n2-skopeo");
    std::fs::create_dir_all(&skopeo_dir).expect("create skopeo dir");
    let skopeo = Skopeo::in_netns(&skopeo_dir, &n2_ns);
    let direct = skopeo
        .inspect_raw(&format!("docker://{}/team/app:v1", c.upstream.host()))
        .await;
    assert_eq!(
        direct, image.manifest_bytes,
        "the manifest skopeo read from the upstream inside n2"
    );
    let pushed = c.upstream_accesses().len();

    // pier without cluster flags in n1; signals sent to the child reach pier itself.
    c.start_node("n1", Membership::Plain);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.node("n1").pid()))
        .expect("read the node's comm");
    assert_eq!(comm.trim(), "pier", "the node's pid is pier's, not ip's");
    let n1_url = c.node("n1").url();
    let n1_ip = c.node("n1").ip;

    // skopeo in n2 pulls through the pier in n1 (path-prefix routing).
    let copy = skopeo.writable_dir(&c.tmp.path().join("n2-copy"));
    skopeo
        .copy(
            &format!("docker://{n1_ip}:5000/{UPSTREAM}/team/app:v1"),
            &oci_ref(&copy, "v1"),
        )
        .await;
    assert_same_blobs(&layout, &copy, &image.digests());

    // containerd in n2 pulls through the pier in n1 (hosts.toml, `?ns=`).
    let hosts = hosts_dir(&c.tmp.path().join("n2-hosts"), &n1_url, &c.upstream_url());
    let containerd = Containerd::start_in_netns(&c.tmp.path().join("n2-ctrd"), &n2_ns);
    containerd
        .pull(&hosts, &format!("{UPSTREAM}/team/app:v1"))
        .await;
    containerd.assert_unpacked(&image);

    // The upstream served each blob once, and only ever to n1's pier.
    let counts = UpstreamCounts::of(&c.upstream_accesses()[pushed..], "team/app", &[n1_ip]);
    println!("upstream requests after the push:\n{}", counts.table());
    assert!(
        counts.from_elsewhere.is_empty(),
        "requests reached the upstream from outside n1: {:?}",
        counts.from_elsewhere
    );
    for blob in image.blobs() {
        let path = format!("/v2/team/app/blobs/{}", blob.digest);
        assert_eq!(counts.gets_of(&path), 1, "upstream GETs of {path}");
    }

    // Partition: nothing in or out of n1, whichever side starts; heal undoes it.
    let n1_main = c.node("n1").main_addr();
    let upstream_addr: SocketAddr = c.upstream.host().parse().expect("upstream address");
    c.net.partition("n1");
    assert_eq!(http_status_at(n1_main, "/v2/"), None, "root → n1 while cut");
    assert!(!c.net.can_connect("n2", n1_main), "n2 → n1 while cut");
    assert!(
        !c.net.can_connect("n1", upstream_addr),
        "n1 → upstream while cut"
    );
    assert!(c.net.can_connect("n2", upstream_addr), "n2 → upstream");
    c.net.heal("n1");
    assert_eq!(
        http_status_at(n1_main, "/v2/"),
        Some(200),
        "root → n1 healed"
    );
    assert!(c.net.can_connect("n2", n1_main), "n2 → n1 healed");
    assert!(
        c.net.can_connect("n1", upstream_addr),
        "n1 → upstream healed"
    );

    // Hang: the kernel still accepts connections, pier answers nothing until resumed.
    c.node("n1").hang();
    assert!(
        c.net.can_connect("n2", n1_main),
        "a hung node still accepts"
    );
    assert_eq!(http_status_at(n1_main, "/v2/"), None, "a hung node answers");
    c.node("n1").resume();
    assert_eq!(http_status_at(n1_main, "/v2/"), Some(200), "resumed");

    // Kill: connections are refused; restarted on the same data, n1 serves what it stored,
    // with the upstream gone.
    c.node_mut("n1").kill();
    assert!(!c.net.can_connect("n2", n1_main), "a killed node accepts");
    c.node_mut("n1").spawn();
    c.upstream.kill();
    let again = pull_image(
        &c.http,
        &n1_url,
        &format!("{UPSTREAM}/team/app"),
        "v1",
        &image,
    )
    .await;
    c.check("pull from the restarted n1 with the upstream down", again)
        .await;

    drop(containerd);
    drop(c);
    let listed = run(&["ip", "netns", "list"]);
    for ns in namespaces {
        assert!(!listed.contains(&ns), "{ns} left behind:\n{listed}");
    }
    println!("harness checks took {:?}", t0.elapsed());
}
