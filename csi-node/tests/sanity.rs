//! The upstream `csi-sanity` suite (kubernetes-csi/csi-test, built by `scripts/setup` from the
//! module pinned in `tools/csi-sanity`) against the real plugin and mounter binaries over the
//! plugin's unix socket.
//!
//! Every Identity and Node test that applies to a node-only driver runs. Skipped here, because
//! they begin with `CreateVolume`, which a node-only driver does not serve (the PV and its volume
//! context come from the operator): the `[Controller Server]` suite, "should remove target path",
//! "should fail when volume does not exist on the specified path" and NodeStageVolume's "should
//! fail when no volume capability is provided". The suite skips by itself what the plugin does
//! not advertise (node expansion, volume health, single-node-multi-writer, group snapshots,
//! snapshot metadata) and its controller-driven lifecycle tests. `kubelet.rs` covers what the
//! skipped tests would have: real mounts, removal of target paths, and NotFound for a wrong path.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::*;

/// What csi-sanity must report as passed: the node-only driver's share of the suite.
const MUST_PASS: &[&str] = &[
    "Identity Service GetPluginCapabilities should return appropriate capabilities",
    "Identity Service Probe should return appropriate information",
    "Identity Service GetPluginInfo should return appropriate information",
    "Node Service NodeGetCapabilities should return appropriate capabilities",
    "Node Service NodeGetInfo should return appropriate values",
    "Node Service NodePublishVolume should fail when no volume id is provided",
    "Node Service NodePublishVolume should fail when no target path is provided",
    "Node Service NodePublishVolume should fail when no volume capability is provided",
    "Node Service NodeUnpublishVolume should fail when no volume id is provided",
    "Node Service NodeUnpublishVolume should fail when no target path is provided",
    "Node Service NodeStageVolume should fail when no volume id is provided",
    "Node Service NodeStageVolume should fail when no staging target path is provided",
    "Node Service NodeUnstageVolume should fail when no volume id is provided",
    "Node Service NodeUnstageVolume should fail when no staging target path is provided",
    "Node Service NodeGetVolumeStats should fail when no volume id is provided",
    "Node Service NodeGetVolumeStats should fail when no volume path is provided",
    "Node Service NodeGetVolumeStats should fail when volume is not found",
];

/// Skipped by us, with the reason (ginkgo regular expressions over the full test name).
const SKIPS: &[(&str, &str)] = &[
    (
        r"\[Controller Server\]",
        "a node-only driver has no Controller service",
    ),
    (
        r"should remove target path",
        "begins with CreateVolume; kubelet.rs checks that unpublish removes the target",
    ),
    (
        r"does not exist on the specified path",
        "begins with CreateVolume; kubelet.rs checks stats of a wrong path",
    ),
    (
        r"NodeStageVolume should fail when no volume capability is provided",
        "begins with CreateVolume; kubelet.rs sends a stage without a capability",
    ),
];

/// `(name, status)` of every test case in a ginkgo JUnit report.
fn junit_cases(xml: &str) -> Vec<(String, String)> {
    let attr = |tag: &str, key: &str| -> Option<String> {
        let start = tag.find(&format!(" {key}=\""))? + key.len() + 3;
        let len = tag[start..].find('"')?;
        Some(
            tag[start..start + len]
                .replace("&#34;", "\"")
                .replace("&quot;", "\"")
                .replace("&amp;", "&")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&#39;", "'"),
        )
    };
    xml.split("<testcase")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            let name = attr(tag, "name")?;
            let status = attr(tag, "status")?;
            // "[It] Node Service ..." → "Node Service ..."
            let name = name.trim_start_matches("[It] ").to_string();
            Some((name, status))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_csi_sanity_passes_every_node_test_that_applies() {
    let bin = std::env::var("LAKECACHE_CSI_SANITY").unwrap_or_else(|_| "csi-sanity".into());
    let root = tempfile::tempdir().unwrap();
    let mut node = NodeProcs::new(root.path());
    node.start_mounter();
    node.start_plugin();
    let _ready = node.connect().await;

    let report = root.path().join("junit.xml");
    let skip = SKIPS
        .iter()
        .map(|(re, _)| *re)
        .collect::<Vec<_>>()
        .join("|");
    let out = Command::new(&bin)
        .arg(format!("--csi.endpoint=unix://{}", node.socket.display()))
        .arg(format!(
            "--csi.mountdir={}",
            root.path().join("sanity-mnt").display()
        ))
        .arg(format!(
            "--csi.stagingdir={}",
            root.path().join("sanity-stage").display()
        ))
        .arg(format!("-ginkgo.skip={skip}"))
        .arg(format!("-ginkgo.junit-report={}", report.display()))
        .arg("-ginkgo.no-color")
        .arg("-ginkgo.timeout=5m")
        .output()
        .unwrap_or_else(|e| {
            panic!("running {bin}: {e}; scripts/setup builds it and exports LAKECACHE_CSI_SANITY")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let xml = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no JUnit report from csi-sanity ({e}):\n{stdout}"));
    let cases = junit_cases(&xml);
    let mut by_status: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, status) in &cases {
        by_status.entry(status).or_default().push(name);
    }
    for (status, names) in &by_status {
        eprintln!("csi-sanity {status}: {}", names.len());
        if *status != "skipped" {
            for n in names {
                eprintln!("  {n}");
            }
        }
    }
    for (re, why) in SKIPS {
        eprintln!("skipped by us: /{re}/: {why}");
    }
    let failed = by_status.get("failed").cloned().unwrap_or_default();
    assert!(
        failed.is_empty(),
        "csi-sanity failures: {failed:#?}\n{stdout}"
    );
    assert!(
        out.status.success(),
        "csi-sanity exited with {}:\n{stdout}",
        out.status
    );
    let passed = by_status.get("passed").cloned().unwrap_or_default();
    for name in MUST_PASS {
        assert!(
            passed.contains(name),
            "{name:?} did not pass; passed: {passed:#?}"
        );
    }
    // Nothing of ours ran beyond the list: a new upstream test shows up here to be looked at.
    let extra: Vec<_> = passed.iter().filter(|n| !MUST_PASS.contains(n)).collect();
    assert!(
        extra.is_empty(),
        "new csi-sanity tests passed; add them to MUST_PASS: {extra:#?}"
    );
    // csi-sanity removed what it created and the plugin left nothing mounted.
    assert!(
        lakecache_csi_node::mounts::mount_table()
            .unwrap()
            .iter()
            .all(|m| !m.mount_point.starts_with(root.path())),
        "csi-sanity left mounts behind"
    );
}

#[test]
fn junit_parsing_reads_names_and_statuses() {
    let xml = r#"<testsuites><testsuite>
<testcase name="[It] Node Service NodeGetInfo should return appropriate values" classname="x" status="passed" time="0.01"></testcase>
<testcase name="[It] Node Service &#34;quoted&#34;" classname="x" status="skipped" time="0"><skipped message="x"/></testcase>
<testcase name="[It] Identity Service Probe" classname="x" status="failed" time="0"><failure/></testcase>
</testsuite></testsuites>"#;
    let c = junit_cases(xml);
    assert_eq!(c.len(), 3);
    assert_eq!(
        c[0],
        (
            "Node Service NodeGetInfo should return appropriate values".into(),
            "passed".into()
        )
    );
    assert_eq!(c[1].0, "Node Service \"quoted\"");
    assert_eq!(c[2].1, "failed");
}
